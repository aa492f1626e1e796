"""Invariant 1: the engine's logits and greedy tokens equal PeftModel's, whatever else is in the batch."""

from __future__ import annotations

import pytest
import torch

from conftest import make_engine, peft_logits, record_logits
from mux.engine.sequence import SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
PROMPTS = [
    "The quick brown fox jumps over the lazy dog",
    "Hello",
    "In 1905 Einstein published four papers that changed physics forever, and",
    "def fibonacci(n):",
]

TORCH = {"lora_kernel": "torch", "attention": "sdpa"}  # torch's LoRA layouts and SDPA: forced choices


@pytest.fixture(scope="module")
def engine(tiny_dir):
    return make_engine(tiny_dir, max_loras=4, max_lora_rank=16)


def check_against_peft(tiny_dir, adapter, completion, logits, tol=1e-3):
    ids = completion.prompt_token_ids + completion.token_ids
    ref = peft_logits(tiny_dir, adapter, ids)
    n = len(completion.prompt_token_ids)
    expected = ref[n - 1 : len(ids) - 1]  # logits that predicted each output token
    got = torch.stack(logits)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= tol
    assert completion.token_ids == expected.argmax(-1).tolist()


@pytest.mark.parametrize("name", ["r4-attn", "r8-mlp", "r16-all", "r8-all-rslora", "r2-down", "r16-attn-rslora"])
def test_single_adapter_matches_peft(engine, tiny_dir, tiny_adapters, name):
    seen = record_logits(engine)
    out = engine.generate([PROMPTS[0]], GREEDY, [tiny_adapters[name]])[0]
    check_against_peft(tiny_dir, tiny_adapters[name], out, seen[out.request_id])


def test_adapters_change_the_output(tiny_dir, tiny_adapters):
    """Guard against a vacuous equivalence: every test adapter moves the logits well beyond the tolerance."""
    ids = [1, 2, 3, 4, 5]
    base = peft_logits(tiny_dir, None, ids)
    for adapter in tiny_adapters.values():
        assert (peft_logits(tiny_dir, adapter, ids) - base).abs().max().item() > 0.05


def test_the_torch_backend_runs_no_mux_kernel_and_matches_peft(tiny_dir, tiny_adapters):
    """ModelConfig.backend="torch" (`mux serve --backend torch`): transformers' forward over plain nn.Linear layers,
    torch's LoRA layouts and SDPA attention: no packed linears, no C kernel, no decode loop; PEFT's results."""
    from torch import nn

    engine = make_engine(tiny_dir, max_loras=4, model={"backend": "torch"})
    assert engine.linear_plan is None and not engine.lora.native and not engine.cache.native
    assert engine.runner.cpu_decode is None
    assert all(type(layer.base) is nn.Linear for layer in engine.lora.layers.values())
    seen = record_logits(engine)
    adapters = [tiny_adapters["r16-all"], tiny_adapters["r8-all-rslora"], None]
    outs = engine.generate(PROMPTS[:3], GREEDY, adapters)
    for out, adapter in zip(outs, adapters, strict=True):
        check_against_peft(tiny_dir, adapter, out, seen[out.request_id])


@pytest.mark.parametrize("native", [True, False])  # the C kernels (CPU default) and torch's
def test_mixed_batch_matches_peft_per_request(tiny_dir, tiny_adapters, native):
    """8 adapters + base-only requests in one batch with more adapters than slots."""
    engine = make_engine(tiny_dir, max_loras=4, max_lora_rank=16, force=None if native else TORCH)
    assert engine.lora.native == engine.cache.native == native
    seen = record_logits(engine)
    names = list(tiny_adapters)
    adapters = [tiny_adapters[n] for n in names] + [None, None]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(adapters))]
    outs = engine.generate(prompts, GREEDY, adapters)
    for out, adapter in zip(outs, adapters, strict=True):
        check_against_peft(tiny_dir, adapter, out, seen[out.request_id])
    assert engine.adapters.num_pinned == 0 and engine.blocks.num_free == engine.blocks.num_blocks


def test_batch_invariance_alone_batched_and_mid_flight(tiny_dir, tiny_adapters):
    engine = make_engine(tiny_dir, max_loras=8, max_lora_rank=16)
    target = tiny_adapters["r8-all-rslora"]
    alone = engine.generate([PROMPTS[2]], GREEDY, [target])[0].token_ids

    others = [tiny_adapters[n] for n in tiny_adapters if tiny_adapters[n] != target][:7]
    mixed = engine.generate(
        [PROMPTS[0], *PROMPTS[:3] * 2, PROMPTS[2], PROMPTS[1]], GREEDY, [others[0], *others[1:7], target, None]
    )
    assert mixed[7].token_ids == alone

    # Join a running batch mid-flight: start 4 streams, step a few times, then submit the target.
    long = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    running = [engine.submit(p, long, a) for p, a in zip(PROMPTS, [others[0], None, others[1], others[2]], strict=True)]
    for _ in range(5):
        engine.step()
    assert engine.num_running == 4
    late = engine.submit(PROMPTS[2], GREEDY, target)
    assert late.result().token_ids == alone
    assert all(s.result().finish_reason == "length" for s in running)


@pytest.mark.parametrize("prefill_first_max_decodes", [16, 0])
def test_chunked_prefill_and_prefix_attention_match(tiny_dir, tiny_adapters, prefill_first_max_decodes):
    """A prompt longer than the step token budget is prefilled in chunks that attend to cached KV; prompts and
    decodes share steps (0) or prefills run in steps of their own (16)."""
    from mux.config import CacheConfig, EngineConfig, LoRAConfig, ModelConfig, SchedulerConfig
    from mux.engine.engine import Engine

    engine = Engine(
        EngineConfig(
            model=ModelConfig(model=str(tiny_dir)),
            lora=LoRAConfig(max_loras=2),
            cache=CacheConfig(block_size=4, kv_cache_bytes=8 << 20),
            scheduler=SchedulerConfig(max_num_batched_tokens=7, prefill_first_max_decodes=prefill_first_max_decodes),
        )
    )
    seen = record_logits(engine)
    prompt = " ".join(PROMPTS)
    adapter = tiny_adapters["r16-all"]
    out = engine.generate([prompt, PROMPTS[1]], GREEDY, [adapter, None])
    check_against_peft(tiny_dir, adapter, out[0], seen[out[0].request_id])
    check_against_peft(tiny_dir, None, out[1], seen[out[1].request_id])


def test_slot_reuse_leaves_no_trace(tiny_dir, tiny_adapters):
    """With one slot, X replaces Y in the same slot; X's results equal X run on a fresh engine."""
    engine = make_engine(tiny_dir, max_loras=1, max_lora_rank=16)
    x, y = tiny_adapters["r4-attn"], tiny_adapters["r16-all"]
    fresh = make_engine(tiny_dir, max_loras=1, max_lora_rank=16).generate([PROMPTS[0]], GREEDY, [x])[0]
    engine.generate([PROMPTS[0]], GREEDY, [y])
    assert engine.adapters.resident()  # y resident
    seen = record_logits(engine)
    reused = engine.generate([PROMPTS[0]], GREEDY, [x])[0]
    assert reused.token_ids == fresh.token_ids
    check_against_peft(tiny_dir, x, reused, seen[reused.request_id])
    lora, slot = engine.lora, engine.adapters.resident()[reused_key(engine)]
    layer = next(iter(lora.layers.values()))  # x (rank 4, attention) reads zeros past its rank, not y's pages
    assert (lora.ctx.table[slot, 4:] == lora.zero_row).all()
    assert not layer.lora_a[lora.zero_row].any() and not layer.lora_b[lora.zero_row].any()


def reused_key(engine) -> str:
    (key,) = engine.adapters.resident()
    return key


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_other_families_match_peft(tmp_path, smollm2_dir, family):
    from conftest import build_tiny_model, make_adapter

    model_dir = build_tiny_model(tmp_path / family, family, smollm2_dir)
    adapter = make_adapter(model_dir, tmp_path / "adapter", r=8, alpha=16, seed=9)
    engine = make_engine(model_dir, max_loras=2, max_lora_rank=8)
    seen = record_logits(engine)
    outs = engine.generate([PROMPTS[0], PROMPTS[1]], GREEDY, [adapter, None])
    check_against_peft(model_dir, adapter, outs[0], seen[outs[0].request_id])
    check_against_peft(model_dir, None, outs[1], seen[outs[1].request_id])


@pytest.mark.parametrize("budget", [2048, 7])
def test_prompt_logprobs_match_peft(tiny_dir, tiny_adapters, budget):
    """Each prompt token's logprob given the ones before it, with its rank and the top 3: in one prefill, and
    in chunks of 7 tokens (spans of several steps)."""
    from conftest import peft_logits
    from mux.config import CacheConfig, EngineConfig, LoRAConfig, ModelConfig, SchedulerConfig
    from mux.engine.engine import Engine

    engine = Engine(
        EngineConfig(
            model=ModelConfig(model=str(tiny_dir)),
            lora=LoRAConfig(max_loras=2),
            cache=CacheConfig(block_size=4, kv_cache_bytes=8 << 20),
            scheduler=SchedulerConfig(max_num_batched_tokens=budget),
        )
    )
    adapter = tiny_adapters["r16-all"]
    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True, prompt_logprobs=3)
    out, plain = engine.generate([" ".join(PROMPTS)] * 2, [params, GREEDY], [adapter, adapter])
    ids = out.prompt_token_ids
    ref = torch.log_softmax(peft_logits(tiny_dir, adapter, ids), dim=-1)  # [n, V]
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids) and plain.prompt_logprobs is None
    for i, entry in enumerate(out.prompt_logprobs[1:], start=1):
        row = ref[i - 1]
        assert entry.logprob == pytest.approx(row[ids[i]].item(), abs=1e-3)
        above = [int((row > row[ids[i]] + d).sum()) + 1 for d in (1e-3, -1e-3)]  # ties within the tolerance
        assert above[0] <= entry.rank <= above[1]
        assert [t for t, _ in entry.top] == row.topk(3).indices.tolist()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA path itself serves there")
def test_the_triton_path_matches_peft_through_the_interpreter(tiny_dir, tiny_adapters, monkeypatch):
    """The engine as it runs on CUDA minus the graphs (per-token LoRA rows and paged decode attention in Triton),
    here with the kernels in Triton's interpreter on the CPU (tests/conftest.py): a mixed batch equal to PEFT."""
    from mux import triton_ops

    if triton_ops.triton is None:
        pytest.skip("triton is not installed")
    monkeypatch.setattr(triton_ops, "serves", lambda device: True)
    engine = make_engine(tiny_dir, max_loras=4, max_lora_rank=16, force={"lora_kernel": "torch", "attention": "sdpa"})
    assert engine.runner.per_token_lora and engine.cache.paged and not engine.lora.native
    seen = record_logits(engine)
    names = ["r4-attn", "r8-mlp", "r16-all", "r8-all-rslora"]
    adapters = [tiny_adapters[n] for n in names] + [None]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(adapters))]
    with triton_ops._untuned():  # one config each: the timing that picks one needs a GPU
        outs = engine.generate(prompts, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True), adapters)
    for out, adapter in zip(outs, adapters, strict=True):
        check_against_peft(tiny_dir, adapter, out, seen[out.request_id])
