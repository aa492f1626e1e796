"""The C LoRA kernel (mux/lora/native.py, lora_cpu.c) against the per-token reference, and its fallbacks."""

from __future__ import annotations

import random
import shutil

import pytest
import torch

from bench.common import group_rows
from mux.lora import native
from mux.lora.ops import build_lora_batch, lora_add_, lora_delta_reference

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")


def test_the_kernel_builds_on_a_machine_with_a_compiler():
    assert native.library() is not None


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
        lora_add_(y, x, a, b, batch)
    ref = lora_delta_reference(x, a, b, token_slots)
    assert torch.allclose(y - before, ref, atol=1e-4, rtol=1e-4)
    assert torch.equal(wide[:, out_f:], tail)  # the columns past the view are untouched


def test_non_contiguous_input_rows():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 10, generator=g).T  # [10, 24], column stride 10
    a, b = torch.randn(2, 4, 24, generator=g), torch.randn(2, 4, 9, generator=g)
    token_slots = [i % 3 - 1 for i in range(10)]
    y = torch.zeros(10, 9)
    lora_add_(y, x, a, b, build_lora_batch(group_rows(token_slots), 4, "cpu", use_native=True))
    assert torch.allclose(y, lora_delta_reference(x, a, b, token_slots), atol=1e-5)


def test_rows_are_split_into_items_for_both_cores():
    rows = native.native_rows({3: list(range(40)), 0: [40, 41]}, {3: 8, 0: 4})
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
        assert "native LoRA kernel off" in caplog.text
        lora = MultiLoRAModel(AutoModelForCausalLM.from_pretrained(tiny_dir), 2, 8)
        assert not lora.native
        monkeypatch.setenv("CC", "false")  # a compiler that fails: the same
        native.library.cache_clear()
        assert native.library() is None
        assert not list(tmp_path.glob("native/*"))  # no half-built library left behind
    finally:
        native.library.cache_clear()
        monkeypatch.undo()
        assert native.library() is not None
