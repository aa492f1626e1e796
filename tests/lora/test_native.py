"""The C kernels (mux/native.py, mux/csrc/): the LoRA kernel against the per-token reference; the fallbacks."""

from __future__ import annotations

import os
import random
import shutil
import time

import pytest
import torch

from bench.common import group_rows
from mux import native
from mux.lora.ops import (
    build_lora_batch,
    few_rows_linear_lora,
    lora_add_,
    lora_delta_reference,
    native_rows,
    stacked_pool,
)
from mux.runtime.picks import ROW_BUCKETS

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")


def test_the_kernel_builds_on_a_machine_with_a_compiler():
    assert native.library() is not None


def test_a_build_prunes_libraries_unused_for_a_month(tmp_path, monkeypatch):
    monkeypatch.setenv("MUX_CACHE_DIR", str(tmp_path))
    cache = tmp_path / "native"
    cache.mkdir()
    old, recent, crashed = cache / "mux-cpu-old.so", cache / "mux-cpu-recent.so", cache / "x.so.tmp"
    for path in (old, recent, crashed):
        path.write_bytes(b"")
    month_ago = time.time() - native.STALE_S - 60
    for path in (old, crashed):
        os.utime(path, (month_ago, month_ago))
    built = native._build()
    assert built.exists() and recent.exists() and not old.exists() and not crashed.exists()
    os.utime(built, (month_ago, month_ago))
    assert native._build() == built and built.stat().st_mtime > month_ago  # loading it marks it in use


def test_every_kernel_source_is_packaged():
    """A wheel must carry what the build compiles: every file in mux/csrc matches the package data."""
    import tomllib
    from fnmatch import fnmatch
    from pathlib import Path

    root = Path(native.__file__).parent
    patterns = tomllib.loads((root.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["mux"]
    for source in native.CSRC.iterdir():
        assert any(fnmatch(str(source.relative_to(root)), p) for p in patterns), source


def test_one_openmp_runtime_after_loading():
    """The library links the libgomp torch loaded (same soname): a second OpenMP team would slow every step."""
    native.library()
    with open("/proc/self/maps") as f:
        gomps = {line.split()[-1] for line in f if "libgomp" in line.rsplit("/", 1)[-1]}
    assert len(gomps) == 1


@pytest.mark.parametrize("seed", range(12))
def test_equals_reference(seed):
    """Any rows order, slots with their own ranks (zero padding past them), sizes not multiples of the vector
    width, runs longer than a work item, rows of a wider tensor (row stride != width)."""
    rnd = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    tokens, slots, max_rank = rnd.choice([1, 7, 40, 300]), rnd.choice([1, 3, 6]), rnd.choice([1, 4, 8, 16])
    in_f, out_f = rnd.choice([8, 13, 64, 100]), rnd.choice([5, 16, 40, 129])
    ranks = [rnd.randint(1, max_rank) for _ in range(slots)]
    a = torch.randn(slots, max_rank, in_f, generator=g)
    b = torch.randn(slots, max_rank, out_f, generator=g)
    for s, r in enumerate(ranks):
        a[s, r:] = 0
        b[s, r:] = 0
    x = torch.randn(tokens, in_f, generator=g)
    token_slots = [rnd.choice([-1, *range(slots)]) for _ in range(tokens)]
    if seed % 2:  # long runs of one slot (prefill chunks)
        token_slots = sorted(token_slots)
    batch = build_lora_batch(group_rows(token_slots), max(ranks), "cpu", slot_ranks=ranks, use_native=True)
    wide = torch.randn(tokens, out_f + 3, generator=g)
    y = wide[:, :out_f]  # row stride out_f + 3
    before, tail = y.clone(), wide[:, out_f:].clone()
    if batch is not None:
        lora_add_(y, x, *stacked_pool(a, b, shuffle=7), batch)
    ref = lora_delta_reference(x, a, b, token_slots)
    assert torch.allclose(y - before, ref, atol=1e-4, rtol=1e-4)
    assert torch.equal(wide[:, out_f:], tail)  # the columns past the view are untouched


def test_non_contiguous_input_rows():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 10, generator=g).T  # [10, 24], column stride 10
    a, b = torch.randn(2, 4, 24, generator=g), torch.randn(2, 4, 9, generator=g)
    token_slots = [i % 3 - 1 for i in range(10)]
    y = torch.zeros(10, 9)
    lora_add_(
        y, x, *stacked_pool(a, b, shuffle=7), build_lora_batch(group_rows(token_slots), 4, "cpu", use_native=True)
    )
    assert torch.allclose(y, lora_delta_reference(x, a, b, token_slots), atol=1e-5)


def test_rows_are_split_into_items_for_both_cores():
    rows = native_rows({3: list(range(40)), 0: [40, 41]}, {3: 8, 0: 4})
    slot, rank, off, flat = rows.tensors
    assert rows.items == 4  # 40 rows of slot 3 in items of 16, 16, 8; then slot 0's two
    assert slot.tolist() == [3, 3, 3, 0] and rank.tolist() == [8, 8, 8, 4]
    assert off.tolist() == [0, 16, 32, 40, 42] and flat.tolist() == list(range(42))


def test_no_compiler_means_the_torch_kernel(tmp_path, monkeypatch, tiny_dir, caplog):
    from transformers import AutoModelForCausalLM

    from mux.lora.layers import MultiLoRAModel

    monkeypatch.setenv("MUX_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    native.library.cache_clear()
    try:
        assert native.library() is None
        assert "native CPU kernels off" in caplog.text
        lora = MultiLoRAModel(AutoModelForCausalLM.from_pretrained(tiny_dir), 2, 8)
        assert not lora.native
        monkeypatch.setenv("CC", "false")  # a compiler that fails: the same
        native.library.cache_clear()
        assert native.library() is None
        assert not list(tmp_path.glob("native/*"))  # no half-built library left behind
        monkeypatch.delenv("CC")
        (tmp_path / "file").write_text("")
        monkeypatch.setenv("MUX_CACHE_DIR", str(tmp_path / "file" / "cache"))  # a cache that cannot be made
        native.library.cache_clear()
        assert native.library() is None
    finally:
        native.library.cache_clear()
        monkeypatch.undo()
        assert native.library() is not None


@pytest.mark.parametrize("seed", range(10))
def test_decode_attention_equals_sdpa(seed):
    """The C decode attention vs the SDPA path on the same paged cache: scattered blocks, GQA groups of 1-4,
    head dims that are and are not multiples of the vector width, contexts from 1 token to many blocks."""
    from mux.engine.kv_cache import AttentionMetadata, KVCache, mux_attention

    rnd = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    kv_heads, group, head_dim, bs = rnd.choice([1, 2, 3]), rnd.choice([1, 3, 4]), rnd.choice([8, 20, 64, 72]), 4
    batch = rnd.choice([1, 5, 17])
    lens = [rnd.choice([1, 3, 4, 9, rnd.randint(1, 60)]) for _ in range(batch)]
    nb = max(-(-n // bs) for n in lens)
    caches = {}
    for use_native in (True, False):
        caches[use_native] = KVCache(1, batch * nb + 3, bs, kv_heads, head_dim, torch.float32, "cpu", use_native)
    assert caches[True].native and not caches[False].native
    k0 = torch.randn(caches[True].k.shape, generator=g)
    v0 = torch.randn(caches[True].v.shape, generator=g)
    perm = torch.randperm(batch * nb + 3, generator=g)[: batch * nb].view(batch, nb)
    tables = perm[:, : max(-(-n // bs) for n in lens)]
    lens_t = torch.tensor(lens)
    slot_mapping = tables[torch.arange(batch), (lens_t - 1) // bs] * bs + (lens_t - 1) % bs
    mask = (torch.arange(nb * bs)[None, :] < lens_t[:, None])[:, None, None, :]
    query = torch.randn(1, kv_heads * group, batch, head_dim, generator=g)
    key = torch.randn(1, kv_heads, batch, head_dim, generator=g)
    value = torch.randn(1, kv_heads, batch, head_dim, generator=g)
    module = type("Attn", (), {"layer_idx": 0})()
    outs = {}
    for use_native, cache in caches.items():
        cache.k.copy_(k0)
        cache.v.copy_(v0)
        meta = AttentionMetadata(cache, slot_mapping, batch, tables, mask, (), lens_t)
        outs[use_native] = mux_attention(module, query, key, value, None, scaling=0.3, mux_attn=meta)[0]
    assert torch.allclose(outs[True], outs[False], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("vocab", [1, 7, 8, 100, 49152])
def test_argmax_logsumexp_equals_torch(vocab):
    """The sampler's C pass: torch.argmax's first-of-ties rule, logsumexp to float precision, for rows of a wider
    tensor, wide value ranges and -inf entries; a row with a NaN falls back to torch's answer."""
    from mux.engine.sampler import _argmax_logsumexp

    g = torch.Generator().manual_seed(vocab)
    wide = torch.randn(9, vocab + 5, generator=g) * torch.tensor([1.0, 30.0, 0.01, 1, 1, 1, 1, 1, 1])[:, None]
    logits = wide[:, :vocab]
    logits[3] = 0.5  # all tied
    logits[4, vocab // 2 :] = float("-inf")
    if vocab > 2:
        logits[5, 1] = logits[5, vocab - 1] = logits[5].max() + 1  # a tie between two maxima
    tokens, lse = _argmax_logsumexp(logits)
    assert tokens.tolist() == logits.argmax(dim=-1).tolist()
    assert torch.allclose(lse, torch.logsumexp(logits, dim=-1), rtol=1e-5, atol=1e-5)
    logits[6, vocab // 3] = float("nan")
    tokens, lse = _argmax_logsumexp(logits)
    assert tokens.tolist() == logits.argmax(dim=-1).tolist()
    assert torch.isnan(lse[6]) and torch.allclose(lse[:6], torch.logsumexp(logits[:6], dim=-1), rtol=1e-5)


def test_long_runs_above_rank_8_go_in_place():
    """With the C kernel, a run of >= 8 rows of a slot above rank 8 is two matmuls (MKL beat C there); the rest C."""
    groups = {0: list(range(10)), 1: list(range(10, 20)), 2: [20, 21]}
    batch = build_lora_batch(groups, 16, "cpu", slot_ranks=[16, 8, 32], use_native=True)
    assert batch.segments == ((0, 0, 10, 16),)
    assert batch.native.tensors[0].tolist() == [1, 2] and batch.native.tensors[3].tolist() == [*range(10, 22)]
    only_runs = build_lora_batch({0: list(range(9))}, 16, "cpu", use_native=True)
    assert only_runs.native is None and only_runs.segments == ((0, 0, 9, 16),)
    x, a, b = torch.randn(9, 12), torch.randn(1, 16, 12), torch.randn(1, 16, 5)
    y = torch.zeros(9, 5)
    lora_add_(y, x, *stacked_pool(a, b, shuffle=7), only_runs)
    assert torch.allclose(y, lora_delta_reference(x, a, b, [0] * 9), atol=1e-4)


def test_slot_loads_in_c_equal_torch_copies(tiny_dir, tiny_adapters):
    """The C page copy (CPU float32) fills the pool exactly as torch's batched copies do, over adapters of
    different ranks and targets loaded one after another into the same interleaved pages (stale rows zeroed)."""
    from transformers import AutoModelForCausalLM

    from mux.lora.adapter import load_adapter
    from mux.lora.layers import MultiLoRAModel, pages_for

    c = MultiLoRAModel(AutoModelForCausalLM.from_pretrained(tiny_dir), 2, 16, use_native=True)
    py = MultiLoRAModel(AutoModelForCausalLM.from_pretrained(tiny_dir), 2, 16, use_native=False)
    assert c.native and not py.native and c.num_pages == 8
    for i, path in enumerate(list(tiny_adapters.values()) * 2):
        weights = load_adapter(path, c.shapes, 16)
        pages = ((0, 2, 4, 6), (7, 5, 3, 1))[i % 2][: pages_for(weights.rank)]
        c.load(i % 2, pages, weights)
        py.load(i % 2, pages, weights)
        assert torch.equal(c.ctx.table, py.ctx.table)
        for name in c.layers:
            assert torch.equal(c.layers[name].lora_a, py.layers[name].lora_a), name
            assert torch.equal(c.layers[name].lora_b, py.layers[name].lora_b), name


@pytest.mark.parametrize("kernel", ["c", "c_bf16", "c_int8", "c_int4"])
@pytest.mark.parametrize("seed", range(10))
def test_the_fused_few_row_linear_is_bitwise_the_linear_then_the_lora_kernel(seed, kernel):
    """A step of <= 8 rows, on each weight format: each linear and its deltas in one call (`few_rows_linear_lora`)
    gives exactly what the few-row linear then the LoRA kernel give, and PEFT's sum: rows with and without adapters,
    one adapter on several rows, ranks off the groups of four, widths off the vectors and the output blocks, a
    bias."""
    from torch import nn

    from mux.model.cpu import FEW_ROWS, PackedLinear
    from tests.test_model_cpu import rounded

    rnd = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    in_f, out_f = rnd.choice([(80, 50), (576, 192), (37, 130), (16, 7)])
    rows, slots, max_rank = rnd.randint(1, FEW_ROWS), 4, 16
    linear = rounded(nn.Linear(in_f, out_f, bias=seed % 2 == 0), kernel)  # int8, int4: quantized
    base = PackedLinear(linear, kernel)
    ranks = [rnd.choice([1, 3, 4, 5, 8, 13, 16]) for _ in range(slots)]
    a = torch.randn(slots, max_rank, in_f, generator=g)
    b = torch.randn(slots, max_rank, out_f, generator=g)
    for s, r in enumerate(ranks):
        a[s, r:] = 0
        b[s, r:] = 0
    token_slots = [rnd.randrange(slots), *(rnd.choice([-1, *range(slots)]) for _ in range(rows - 1))]
    x = torch.randn(rows, in_f, generator=g)
    batch = build_lora_batch(group_rows(token_slots), max(ranks), "cpu", slot_ranks=ranks, use_native=True, rows=rows)
    assert batch.few is not None and batch.few.rows == rows
    two_calls = base(x)
    lora_add_(two_calls, x, *stacked_pool(a, b, shuffle=7), batch)
    fused = few_rows_linear_lora(base, x, *stacked_pool(a, b, shuffle=7), batch.few)
    assert torch.equal(fused, two_calls)
    weight = linear.weight.detach()  # bf16, int8, int4: the rounded weights, fp32 sums
    want = torch.nn.functional.linear(x, weight, linear.bias) + lora_delta_reference(x, a, b, token_slots)
    assert torch.allclose(fused, want, atol=1e-4, rtol=1e-4)


def test_the_fused_call_is_declined_where_its_kernel_cannot_serve():
    """None (the two calls serve) for a base without the few-row kernel, an input of another width, another row
    count than the step's, or a strided input; no fused rows past FEW_ROWS or without the C kernel."""
    from torch import nn

    from mux.model.cpu import FEW_ROWS, PackedLinear

    linear = nn.Linear(64, 32)
    base = PackedLinear(linear, "c")
    a, b = torch.randn(2, 4, 64), torch.randn(2, 4, 32)
    few = build_lora_batch({0: [0], 1: [1]}, 4, "cpu", use_native=True, rows=2).few
    assert few_rows_linear_lora(base, torch.randn(2, 64), *stacked_pool(a, b, shuffle=7), few) is not None
    for module, x in (
        (PackedLinear(linear, "onednn"), torch.randn(2, 64)),
        (PackedLinear(linear, {b: "c" if b > 2 else "onednn" for b in ROW_BUCKETS}), torch.randn(2, 64)),
        (linear, torch.randn(2, 64)),
        (base, torch.randn(2, 80)),
        (base, torch.randn(3, 64)),
        (base, torch.randn(64, 2).T),
    ):
        assert few_rows_linear_lora(module, x, *stacked_pool(a, b, shuffle=7), few) is None
    rows = FEW_ROWS + 1
    assert build_lora_batch({0: list(range(rows))}, 4, "cpu", use_native=True, rows=rows).few is None
    assert build_lora_batch({0: [0]}, 4, "cpu", use_native=True).few is None  # no row count given
    assert build_lora_batch({0: [0]}, 4, "cpu", rows=1).few is None  # torch's layouts


def test_the_engine_fuses_few_row_steps_and_gives_the_same_tokens(tiny_dir, tiny_adapters, monkeypatch):
    """Decode steps of 1-4 sequences with adapters take the fused call for every targeted linear, with the same
    greedy tokens as the two calls (forced "lora_fused": "two_calls"); through transformers' forward (the loop of
    mux/engine/cpu_decode.py, which makes the same calls, is tested in tests/engine/test_cpu_decode.py)."""
    from mux.engine.sequence import SamplingParams
    from mux.lora import layers
    from tests.conftest import make_engine

    calls = []
    fused_call = layers.few_rows_linear_lora
    monkeypatch.setattr(layers, "few_rows_linear_lora", lambda *a: calls.append(fused_call(*a)) or calls[-1])
    greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    adapters = [tiny_adapters["r4-attn"], tiny_adapters["r16-all"], None, tiny_adapters["r2-down"]]
    prompts = ["the quick brown fox", "hello there", "a b c d e", "one two"]
    forward = {"decode": "forward", "linear": "c"}  # the fused call serves where a C kernel is the pick
    fused = make_engine(tiny_dir, max_loras=4, force=forward)
    plain = make_engine(tiny_dir, max_loras=4, force={**forward, "lora_fused": "two_calls"})
    for n in (1, 4):
        got = [o.token_ids for o in fused.generate(prompts[:n], greedy, adapters[:n])]
        assert calls and all(y is not None for y in calls)
        calls.clear()
        assert got == [o.token_ids for o in plain.generate(prompts[:n], greedy, adapters[:n])]
        assert not calls
