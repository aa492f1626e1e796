"""The padded decode step that CUDA graphs capture (mux/engine/graphs.py), run eagerly on the CPU: the same
logits and tokens as PEFT whatever the padding, and the scratch block stays out of every sequence's table."""

from __future__ import annotations

import pytest
from test_equivalence import GREEDY, PROMPTS, check_against_peft

from conftest import make_engine, record_logits
from mux.engine.graphs import DecodeGraphs
from mux.engine.sequence import SamplingParams

TORCH = {"lora_kernel": "torch", "attention": "sdpa"}  # torch's LoRA layouts and SDPA: forced choices


def padded(engine, max_batch: int) -> DecodeGraphs:
    runner = engine.runner
    runner.graphs = DecodeGraphs(runner.model, runner.lora, runner.cache, max_batch, capture=False)
    return runner.graphs


@pytest.mark.parametrize("native", [True, False])  # the C kernels read the padded tables too
def test_padded_decode_matches_peft(tiny_dir, tiny_adapters, native):
    engine = make_engine(tiny_dir, max_loras=4, max_lora_rank=16, force=None if native else TORCH)
    graphs = padded(engine, 8)
    seen = record_logits(engine)
    names = ["r4-attn", "r16-all", "r8-all-rslora", "r2-down", "r8-mlp"]
    adapters = [tiny_adapters[n] for n in names] + [None]  # 6 rows: padded to 8; mixed ranks and a base row
    outs = engine.generate([PROMPTS[i % 4] for i in range(6)], GREEDY, adapters)
    for out, adapter in zip(outs, adapters, strict=True):
        check_against_peft(tiny_dir, adapter, out, seen[out.request_id])
    assert graphs.num_graphs >= 1 and graphs.enabled
    assert engine.blocks.num_free == engine.blocks.num_blocks == engine.cache.scratch_block


def test_padded_decode_with_the_triton_kernels_matches_peft(tiny_dir, tiny_adapters, monkeypatch):
    """The CUDA decode path but the capture: padded steps with per-token LoRA rows (pads: slot -1) and paged
    attention (pads: the scratch block) in Triton, run in Triton's interpreter on the CPU (tests/conftest.py)."""
    import torch

    from mux import triton_ops

    if triton_ops.triton is None or torch.cuda.is_available():
        pytest.skip("needs triton, and no CUDA (there the real path serves)")
    monkeypatch.setattr(triton_ops, "serves", lambda device: True)
    engine = make_engine(tiny_dir, max_loras=4, max_lora_rank=16, force={"lora_kernel": "torch", "attention": "sdpa"})
    assert engine.runner.per_token_lora and engine.cache.paged
    graphs = padded(engine, 8)
    seen = record_logits(engine)
    adapters = [tiny_adapters[n] for n in ("r4-attn", "r16-all", "r8-all-rslora", "r2-down")] + [None]  # 5 → 8
    with triton_ops._untuned():  # one config each: the timing that picks one needs a GPU
        outs = engine.generate(
            [PROMPTS[i % 4] for i in range(5)], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True), adapters
        )
    for out, adapter in zip(outs, adapters, strict=True):
        check_against_peft(tiny_dir, adapter, out, seen[out.request_id])
    assert graphs.num_graphs >= 1


def test_base_only_decodes_and_batches_past_the_largest_graph(tiny_dir, tiny_adapters):
    """Base-only steps get a graph with no LoRA; a step of more sequences than the largest graph runs eagerly,
    and the shorter requests' later steps, now small enough, replay."""
    engine = make_engine(tiny_dir, max_loras=4, max_lora_rank=16)
    graphs = padded(engine, 2)
    seen = record_logits(engine)
    streams = [
        engine.submit(PROMPTS[i], SamplingParams(max_tokens=4 + 6 * (i % 2), temperature=0, ignore_eos=True), a)
        for i, a in enumerate([None, None, tiny_adapters["r8-mlp"], None])
    ]
    outs = [s.result() for s in streams]
    for out, adapter in zip(outs, [None, None, tiny_adapters["r8-mlp"], None], strict=True):
        check_against_peft(tiny_dir, adapter, out, seen[out.request_id])
    keys = set(graphs._graphs)
    assert keys and all(batch <= 2 for batch, *_ in keys)


def test_past_the_graph_cap_steps_run_eagerly(tiny_dir, tiny_adapters, monkeypatch):
    import mux.engine.graphs as graphs_module

    monkeypatch.setattr(graphs_module, "MAX_GRAPHS", 1)
    engine = make_engine(tiny_dir, max_loras=4, max_lora_rank=16)
    graphs = padded(engine, 8)
    seen = record_logits(engine)
    adapters = [tiny_adapters["r4-attn"], None, tiny_adapters["r2-down"]]
    outs = engine.generate(PROMPTS[:3], GREEDY, adapters)  # batch 3, then other keys: one graph, the rest eager
    engine.generate(PROMPTS[:1], GREEDY, [None])
    for out, adapter in zip(outs, adapters, strict=True):
        check_against_peft(tiny_dir, adapter, out, seen[out.request_id])
    assert graphs.num_graphs == 1 and graphs.enabled
