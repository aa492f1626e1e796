"""CPU decode steps without transformers' forward (mux/engine/cpu_decode.py): bitwise that forward with the C layers,
at any row count and with either LoRA kernel, for adapters of every kind and for the base model, and declined where
it cannot serve."""

from __future__ import annotations

import pytest
import torch

from mux.engine.cpu_decode import CPUDecode
from mux.engine.sequence import SamplingParams
from mux.model.cpu import FEW_ROWS
from mux.runtime.picks import ROW_BUCKETS
from tests.conftest import make_engine, record_logits

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
PROMPTS = ["the quick brown fox", "hello there", "a b c d e", "one two three four five six", "five", "six seven"]
PROMPTS += [f"{p} and more" for p in PROMPTS]  # 12
TEN = ("r8-mlp", "r16-attn-rslora", "r8-qv", None, "r4-all", "r2-down", "r16-all", "r8-mlp", None, "r4-attn")


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


@pytest.mark.parametrize("native_kernel", [True, False])
def test_decodes_are_bitwise_transformers_forward(tiny_dir, tiny_adapters, monkeypatch, native_kernel):
    """1-10 sequences with adapters of different ranks, targets, alpha and rslora beside base-model rows: every
    decode step takes the loop, its LoRA rows through the C calls with the C kernel (fused at up to FEW_ROWS
    rows) and through `lora_add_` (torch's layouts) without it, and every logit equals transformers' forward with
    the same kernels."""
    from mux.engine import cpu_decode

    steps = _counting(monkeypatch)
    torch_rows: list[int] = []  # rows of each `lora_add_` call the loop made (torch's layouts)
    add = cpu_decode.lora_add_
    monkeypatch.setattr(cpu_decode, "lora_add_", lambda y, *a: torch_rows.append(len(y)) or add(y, *a))
    lora_kernel = {"lora_kernel": "c" if native_kernel else "torch"}
    fast = make_engine(tiny_dir, max_loras=8, force=lora_kernel)
    slow = make_engine(tiny_dir, max_loras=8, force={"decode": "forward", **lora_kernel})
    assert fast.runner.cpu_decode is not None and slow.runner.cpu_decode is None
    pick = lambda name: name and tiny_adapters[name]  # noqa: E731
    mixes = [
        [tiny_adapters["r16-all"]],
        [None],  # the base model alone: no LoRA batch at all
        [tiny_adapters["r4-attn"], None],
        [tiny_adapters["r8-mlp"], tiny_adapters["r8-all-rslora"], tiny_adapters["r2-down"]],
        [tiny_adapters["r8-qv"], None, tiny_adapters["r16-attn-rslora"], tiny_adapters["r4-all"]],
        [tiny_adapters["r4-attn"], None, tiny_adapters["r16-all"], tiny_adapters["r8-qv"], None],
        [tiny_adapters[n] for n in ("r8-mlp", "r2-down", "r8-mlp", "r8-all-rslora", "r4-all", "r16-attn-rslora")],
        [None] * 5,
        [pick(n) for n in ("r16-all", "r4-attn", None, "r8-qv", "r2-down", None, "r8-all-rslora", "r4-all")],
        [pick(n) for n in TEN],
        [None] * 10,
    ]
    for adapters in mixes:
        steps.clear(), torch_rows.clear()
        _same_logits(fast, slow, PROMPTS[: len(adapters)], adapters)
        assert set(steps) == {len(adapters)}  # every step after the prefill
        assert set(torch_rows) == (set() if native_kernel or set(adapters) == {None} else {len(adapters)})


def test_decodes_without_the_fused_call_are_bitwise_the_two_calls(tiny_dir, tiny_adapters, monkeypatch):
    """The two calls forced ("lora_fused"): the loop's 1-8-row steps make the linear, then the C LoRA kernel, as
    transformers' forward does then."""
    steps = _counting(monkeypatch)
    adapters = [tiny_adapters["r8-qv"], None, tiny_adapters["r16-all"]]
    fast = make_engine(tiny_dir, max_loras=4, force={"lora_fused": "two_calls"})
    slow = make_engine(tiny_dir, max_loras=4, force={"decode": "forward", "lora_fused": "two_calls"})
    _same_logits(fast, slow, PROMPTS[:3], adapters)
    assert set(steps) == {3}


def test_qwen2_with_biases_and_a_joining_request(tmp_path, smollm2_dir, monkeypatch):
    """Qwen2's q/k/v biases; a request joining mid-flight (a step with a prefill runs transformers' forward, the
    decode steps around it the loop); sampling with a seed on both."""
    from bench.common import build_tiny_model, make_adapter

    model_dir = build_tiny_model(tmp_path / "qwen2", "qwen2", smollm2_dir)
    adapter = make_adapter(model_dir, tmp_path / "adapter", r=8, alpha=16, seed=9)
    steps = _counting(monkeypatch)
    fast = make_engine(model_dir, max_loras=2)
    slow = make_engine(model_dir, max_loras=2, force={"decode": "forward"})
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


MIXED = {b: ("c" if b in (1, 4, 16) else "onednn") for b in ROW_BUCKETS}
MIXED_BF16 = {b: ("c_bf16" if b <= 2 or b == 8 else "onednn_bf16") for b in ROW_BUCKETS}


@pytest.mark.parametrize("linear", ["onednn", "c_bf16", "onednn_bf16", MIXED, MIXED_BF16], ids=str)
def test_decodes_are_bitwise_transformers_forward_on_every_linear_pick(tiny_dir, tiny_adapters, monkeypatch, linear):
    """Whatever kernel serves a row count (oneDNN's results copied into the loop's buffers, the fused call only
    where a C kernel serves), the loop equals transformers' forward on the same picks, bit for bit."""
    steps = _counting(monkeypatch)
    fast = make_engine(tiny_dir, max_loras=8, force={"linear": linear})
    slow = make_engine(tiny_dir, max_loras=8, force={"linear": linear, "decode": "forward"})
    pick = lambda name: name and tiny_adapters[name]  # noqa: E731
    for adapters in ([pick("r16-all"), None], [pick(n) for n in ("r4-attn", "r8-qv", None)], [pick(n) for n in TEN]):
        steps.clear()
        _same_logits(fast, slow, PROMPTS[: len(adapters)], adapters)
        assert set(steps) == {len(adapters)}


def test_declined_where_it_cannot_serve(tiny_dir, tiny_adapters):
    """No loop without the C attention or the C layers."""
    engines = make_engine(tiny_dir, force={"attention": "sdpa"}), make_engine(tiny_dir, force={"layers": "torch"})
    for engine in engines:
        assert engine.runner.cpu_decode is None


def test_takes_pure_decode_steps_only():
    from mux.engine.kv_cache import AttentionMetadata, PrefillSpan

    def meta(num_decode, prefills=()):
        return AttentionMetadata(None, None, num_decode, None, None, prefills, None)

    take = CPUDecode.takes
    for rows in (1, FEW_ROWS, FEW_ROWS + 1, 64):
        assert take(rows, meta(rows))
        assert not take(rows, meta(rows - 1, (PrefillSpan(rows - 1, 1, 1, None),)))
    assert not take(0, meta(0))
