"""mux/model/linear_picks.py and mux/runtime/picks.py: the linears' kernels and weight dtype measured on this machine,
kept on disk and never trusted when stale or corrupt; a kernel failing its self-check is never picked; every pick
keeps PEFT's results (fp32 to 1e-3; bf16 to the tolerance measured here)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from mux.model import cpu, linear_picks
from mux.model.cpu import PackedLinear, available_kernels
from mux.runtime import picks
from mux.runtime.picks import ROW_BUCKETS, PickCache, machine_key
from tests.conftest import make_engine, peft_logits, record_logits

pytestmark = pytest.mark.skipif("c" not in available_kernels(), reason="no C compiler or no oneDNN")


@pytest.fixture
def model(tiny_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)


def fake_times(bf16_speed: float):
    """_measure's stand-in: every kernel of a dtype at the same speed, bf16 `bf16_speed`× fp32's time."""

    def measure(members, kernels, failures):
        scale = bf16_speed if cpu.KERNELS[kernels[0]] == "bfloat16" else 1.0
        return {k: {b: scale * b * (1.0 + 0.01 * i) for b in ROW_BUCKETS} for i, k in enumerate(kernels)}

    return measure


def test_picks_are_measured_once_then_read_from_the_cache(model, tmp_path):
    cache = PickCache(machine_key("k1"), root=tmp_path)
    first = linear_picks.plan(model, "float32", cache)
    assert first.measured_s > 0 and first.weight_dtype == "float32"
    assert set(first.picks) == {(m.in_features, m.out_features, "float") for m in cpu.linears(model).values()}
    assert all(set(t) == set(ROW_BUCKETS) and set(t.values()) <= {"c", "onednn"} for t in first.picks.values())
    again = linear_picks.plan(model, "float32", PickCache(machine_key("k1"), root=tmp_path))
    assert again.measured_s == 0 and again.picks == first.picks
    assert not list(tmp_path.glob("*.tmp"))  # written atomically
    report = first.report()
    assert report["weight_dtype"] == "float32" and set(report["linears"]) == {f"{i}x{o}" for i, o, _ in first.picks}


@pytest.mark.parametrize("damage", ["truncated", "other_machine", "unknown_kernel", "missing_bucket", "not_json"])
def test_a_stale_or_corrupt_cache_is_ignored_and_rebuilt(model, tmp_path, damage, monkeypatch):
    key = machine_key("k2")
    linear_picks.plan(model, "float32", PickCache(key, root=tmp_path))
    path = next(tmp_path.glob("*.json"))
    data = json.loads(path.read_text())
    name = next(iter(data["entries"]))
    if damage == "truncated":
        path.write_text(path.read_text()[:50])
    elif damage == "not_json":
        path.write_bytes(b"\xff\xfe" + b"[" * 100_000)
    elif damage == "other_machine":
        data["key"]["cpu"] = "another CPU"
        path.write_text(json.dumps(data))
    else:
        if damage == "unknown_kernel":
            data["entries"][name]["picks"]["1"] = "no_such_kernel"
        else:
            del data["entries"][name]["picks"]["256"]
        path.write_text(json.dumps(data))
    monkeypatch.setattr(picks, "_memory", {})  # as a new process would: read the file
    cache = PickCache(key, root=tmp_path)
    again = linear_picks.plan(model, "float32", cache)
    assert again.measured_s > 0 and cache.rejected >= 1
    for table in again.picks.values():
        assert set(table) == set(ROW_BUCKETS) and set(table.values()) <= {"c", "onednn"}
    monkeypatch.setattr(picks, "_memory", {})
    rebuilt = linear_picks.plan(model, "float32", PickCache(key, root=tmp_path))  # the file was written anew
    assert rebuilt.measured_s == 0 and rebuilt.picks == again.picks


def test_a_kernel_failing_its_self_check_is_never_picked(model, tmp_path, monkeypatch):
    forward = PackedLinear.forward

    def broken(self, x):
        y = forward(self, x)
        return y + 1.0 if self.kernel_for(x.numel() // self.in_features) == "c" else y

    monkeypatch.setattr(PackedLinear, "forward", broken)
    result = linear_picks.plan(model, "float32", PickCache(machine_key("k3"), root=tmp_path))
    assert all(set(t.values()) == {"onednn"} for t in result.picks.values())
    assert result.report()["self_check_failures"] == {"c": len(result.picks)}


@pytest.mark.parametrize(("bf16_speed", "want"), [(0.5, "bfloat16"), (0.89, "bfloat16"), (0.95, "float32")])
def test_auto_takes_bf16_weights_only_where_they_measure_faster(model, tmp_path, monkeypatch, bf16_speed, want):
    monkeypatch.setattr(linear_picks, "_measure", fake_times(bf16_speed))
    with picks.force("weight_dtype", None):
        result = linear_picks.plan(model, "auto", PickCache(machine_key(f"k4-{bf16_speed}"), root=tmp_path))
    assert result.weight_dtype == want and result.bf16_ratio == pytest.approx(bf16_speed, rel=0.02)
    kernels = {k for t in result.picks.values() for k in t.values()}
    assert all(cpu.KERNELS[k] == want for k in kernels)


def test_a_second_layout_is_kept_only_where_it_pays():
    close = {"c": dict.fromkeys(ROW_BUCKETS, 10.0), "onednn": {b: 9.0 if b == 1 else 11.0 for b in ROW_BUCKETS}}
    assert len(set(linear_picks._prune(close).values())) == 1  # ≤ 10% apart anywhere: one layout
    far = {"c": dict.fromkeys(ROW_BUCKETS, 10.0), "onednn": {b: 5.0 if b >= 64 else 20.0 for b in ROW_BUCKETS}}
    table = linear_picks._prune(far)
    assert table[1] == "c" and table[64] == table[256] == "onednn"
    # a clear gain at one bucket does not hand the others to whichever kernel measured luckier there
    noisy = {"c": dict.fromkeys(ROW_BUCKETS, 10.0), "onednn": {b: 9.5 if b % 4 else 10.5 for b in ROW_BUCKETS}}
    noisy["c"][256] = 20.0
    assert set(linear_picks._prune(noisy).values()) == {"onednn"}
    noisy["c"][256], noisy["onednn"][256] = 10.0, 6.0  # ...nor the noisy buckets of the other kernel
    table = linear_picks._prune(noisy)
    assert table[256] == "onednn" and len({table[b] for b in ROW_BUCKETS}) <= 2
    assert len({table[b] for b in ROW_BUCKETS[:-1]}) == 1


def test_forced_picks_are_checked():
    linear = nn.Linear(8, 8)
    with picks.force("linear", {1: "c"}), pytest.raises(ValueError, match="every bucket"):
        linear_picks.plan(nn.Sequential(linear))
    with picks.force("linear", "onednn_bf16"):
        assert linear_picks.plan(nn.Sequential(linear)).weight_dtype == "bfloat16"


# ---- results against PEFT, per pick --------------------------------------------------------------------------
ADAPTERS = ("r8-all-rslora", "r16-attn-rslora", "r2-down", None)
PROMPTS = ("the quick brown fox jumps", "hello there general", "one two three four", "a b c")
GREEDY = dict(max_tokens=6, temperature=0, ignore_eos=True)


def _engine_vs_peft(tiny_dir, tiny_adapters, reference_dir):
    """(max |Δlogit| over every sampled row, the fraction of greedy tokens equal) of an engine built now vs PEFT on
    `reference_dir`'s weights, a mixed batch of adapters of different ranks, targets and rslora."""
    from mux.engine.sequence import SamplingParams

    engine = make_engine(tiny_dir, max_loras=4)
    seen = record_logits(engine)
    adapters = [tiny_adapters[n] if n else None for n in ADAPTERS]
    outs = engine.generate(list(PROMPTS), SamplingParams(**GREEDY), adapters)
    worst, equal, total = 0.0, 0, 0
    for out, adapter in zip(outs, adapters, strict=True):
        ids = out.prompt_token_ids + out.token_ids
        want = peft_logits(reference_dir, adapter, ids)[len(out.prompt_token_ids) - 1 : -1]
        got = torch.stack(seen[out.request_id])
        worst = max(worst, (got - want).abs().max().item())
        equal += int((want.argmax(-1) == torch.tensor(out.token_ids)).sum())
        total += len(out.token_ids)
    return worst, equal / total


@pytest.mark.parametrize("kernel", ["c", "onednn", {b: "c" if b <= 4 else "onednn" for b in ROW_BUCKETS}], ids=str)
def test_every_fp32_pick_gives_peft_s_logits(tiny_dir, tiny_adapters, kernel):
    with picks.force("linear", kernel):
        worst, agree = _engine_vs_peft(tiny_dir, tiny_adapters, tiny_dir)
    assert worst <= 1e-3 and agree == 1.0


def bf16_rounded(model_dir, out_dir):
    """A copy of the model whose decoder linears and lm_head hold their bf16-rounded weights (PEFT's reference for
    the engine's bf16 weights: the adapters and everything else stay fp32)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        for module in cpu.linears(model).values():
            module.weight.copy_(module.weight.to(torch.bfloat16).float())
    model.save_pretrained(out_dir)
    return out_dir


# (max |Δlogit|, greedy agreement) on the tiny model with this adapter mix, measured on an Intel Xeon with AMX: the
# C kernel over bf16 panels sums in fp32, so it is PEFT on the rounded weights to fp32 rounding (within 1e-3, all
# tokens equal); oneDNN's bf16 GEMM also rounds the activations to bf16 (0.148, 23 of 24 tokens). With margin:
BF16_TOLERANCE = {"c_bf16": (1e-3, 1.0), "onednn_bf16": (0.25, 0.9)}


@pytest.mark.parametrize("kernel", ["c_bf16", "onednn_bf16"])
def test_bf16_weights_match_peft_on_the_rounded_weights(tiny_dir, tiny_adapters, tmp_path, kernel):
    if kernel not in available_kernels():
        pytest.skip(f"{kernel} does not run here")
    reference = bf16_rounded(tiny_dir, tmp_path / "rounded")
    with picks.force("linear", kernel):
        worst, agree = _engine_vs_peft(tiny_dir, tiny_adapters, reference)
    max_delta, min_agree = BF16_TOLERANCE[kernel]
    assert worst <= max_delta and agree >= min_agree, (worst, agree)
