"""CPU decode steps of a few sequences as one loop of C calls (mux/engine/cpu_decode.py): bitwise transformers'
forward with the C layers, for adapters of every kind and for the base model, and declined where it cannot serve."""

from __future__ import annotations

import pytest
import torch

from mux.engine.cpu_decode import CPUDecode
from mux.engine.sequence import SamplingParams
from tests.conftest import make_engine, record_logits

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
PROMPTS = ["the quick brown fox", "hello there", "a b c d e", "one two three four five six"]


def _counting(monkeypatch) -> list[int]:
    """Patch CPUDecode.run to count the rows of each step it serves."""
    steps: list[int] = []
    run = CPUDecode.run

    def counted(self, ids, *args):
        steps.append(ids.shape[0])
        return run(self, ids, *args)

    monkeypatch.setattr(CPUDecode, "run", counted)
    return steps


def _same_logits(fast, slow, prompts, adapters, params=GREEDY):
    """Both engines' outputs, with every sampled row's logits equal bit for bit."""
    seen_fast, seen_slow = record_logits(fast), record_logits(slow)
    a, b = fast.generate(prompts, params, adapters), slow.generate(prompts, params, adapters)
    for x, y in zip(a, b, strict=True):
        assert x.token_ids == y.token_ids
        fast_rows, slow_rows = seen_fast[x.request_id], seen_slow[y.request_id]
        assert len(fast_rows) == len(slow_rows) and all(map(torch.equal, fast_rows, slow_rows))
    return a


def test_few_sequence_decodes_are_bitwise_transformers_forward(tiny_dir, tiny_adapters, monkeypatch):
    """1-4 sequences with adapters of different ranks, targets, alpha and rslora beside base-model rows: every
    decode step takes the loop, and every logit equals transformers' forward with the same C kernels."""
    steps = _counting(monkeypatch)
    fast = make_engine(tiny_dir, max_loras=4)
    slow = make_engine(tiny_dir, max_loras=4, model={"cpu_decode": False})
    assert fast.runner.cpu_decode is not None and slow.runner.cpu_decode is None
    mixes = [
        [tiny_adapters["r16-all"]],
        [None],  # the base model alone: no LoRA batch at all
        [tiny_adapters["r4-attn"], None],
        [tiny_adapters["r8-mlp"], tiny_adapters["r8-all-rslora"], tiny_adapters["r2-down"]],
        [tiny_adapters["r8-qv"], None, tiny_adapters["r16-attn-rslora"], tiny_adapters["r4-all"]],
    ]
    for adapters in mixes:
        steps.clear()
        _same_logits(fast, slow, PROMPTS[: len(adapters)], adapters)
        assert steps and set(steps) == {len(adapters)}  # every step after the prefill, at its row count


def test_qwen2_with_biases_and_a_joining_request(tmp_path, smollm2_dir, monkeypatch):
    """Qwen2's q/k/v biases; a request joining mid-flight (a step with a prefill runs transformers' forward, the
    decode steps around it the loop); sampling with a seed on both."""
    from bench.common import build_tiny_model, make_adapter

    model_dir = build_tiny_model(tmp_path / "qwen2", "qwen2", smollm2_dir)
    adapter = make_adapter(model_dir, tmp_path / "adapter", r=8, alpha=16, seed=9)
    steps = _counting(monkeypatch)
    fast = make_engine(model_dir, max_loras=2)
    slow = make_engine(model_dir, max_loras=2, model={"cpu_decode": False})
    _same_logits(fast, slow, PROMPTS[:2], [adapter, None])
    assert steps
    sampled = SamplingParams(max_tokens=8, temperature=0.8, seed=3, ignore_eos=True)
    _same_logits(fast, slow, PROMPTS[:2], [adapter, None], sampled)

    outs = {}
    for name, engine in (("fast", fast), ("slow", slow)):
        first = engine.submit(PROMPTS[3], GREEDY, adapter)
        for _ in range(3):
            engine.step()
        second = engine.submit(PROMPTS[2], GREEDY, None)
        outs[name] = [second.result().token_ids, first.result().token_ids]
    assert outs["fast"] == outs["slow"]


def test_declined_where_it_cannot_serve(tiny_dir, tiny_adapters, monkeypatch):
    """No loop without the C attention, the C layers or the few-row linears, nor for steps of more than 4
    sequences or with the LoRA rows in another layout; those engines give the same tokens all the same."""
    steps = _counting(monkeypatch)
    for engine in (
        make_engine(tiny_dir, native_attention=False),
        make_engine(tiny_dir, model={"native_layers": False}),
        make_engine(tiny_dir, model={"few_row_linears": False}),
    ):
        assert engine.runner.cpu_decode is None
    five = make_engine(tiny_dir, max_loras=4)
    adapters = [tiny_adapters["r4-attn"], None, tiny_adapters["r16-all"], None, tiny_adapters["r2-down"]]
    prompts = [*PROMPTS, "five"]
    five.generate(prompts, GREEDY, adapters)
    assert not steps  # 5 sequences all along
    two_calls = make_engine(tiny_dir, max_loras=4, fused_few_rows=False)
    assert two_calls.runner.cpu_decode is not None
    two_calls.generate(PROMPTS[:2], GREEDY, adapters[:2])
    assert not steps  # adapter rows but no fused few-row layout: transformers' forward


@pytest.mark.parametrize("rows", [1, 4])
def test_takes_only_pure_decode_steps_of_a_few_rows(rows):
    from mux.engine.kv_cache import AttentionMetadata, PrefillSpan

    def meta(num_decode, prefills=()):
        return AttentionMetadata(None, None, num_decode, None, None, prefills, None)

    take = CPUDecode.takes
    assert take(None, rows, meta(rows), None)
    assert not take(None, rows, meta(rows - 1, (PrefillSpan(rows - 1, 1, 1, None),)), None)
    assert not take(None, 5, meta(5), None) and not take(None, 0, meta(0), None)
