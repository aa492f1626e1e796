"""The blocked multi-LoRA kernel against the per-token reference and against W + s·B@A, its slots' rank rows
scattered over the pool as pages are."""

from __future__ import annotations

import random

import pytest
import torch

from bench.common import group_rows
from mux.lora.ops import (
    build_lora_batch,
    choose_block_size,
    lora_add_,
    lora_delta_reference,
    per_token_batch,
    stacked_pool,
)


def random_case(seed: int, tokens: int, slots: int, rank: int, in_f: int = 24, out_f: int = 40):
    rnd = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, in_f, generator=g)
    a = torch.randn(slots, rank, in_f, generator=g)
    b = torch.randn(slots, rank, out_f, generator=g)
    token_slots = [rnd.choice([-1, *range(slots)]) for _ in range(tokens)]
    return x, a, b, token_slots


def runs_case(seed: int, tokens: int, slots: int, rank: int):
    """Like random_case, but tokens come in runs of one slot (prefill chunks, decodes sorted by slot)."""
    x, a, b, _ = random_case(seed, tokens, slots, rank)
    rnd = random.Random(seed)
    token_slots: list[int] = []
    while len(token_slots) < tokens:
        token_slots += [rnd.choice([-1, *range(slots)])] * rnd.choice([1, 2, 7, 8, 30])
    return x, a, b, token_slots[:tokens]


def blocked_full(x, a, b, token_slots, rank, force_runs=False, segment_rows=8, slot_ranks=None):
    out = x.new_zeros(x.shape[0], b.shape[-1])
    groups = group_rows(token_slots)
    batch = build_lora_batch(
        groups, rank, "cpu", force_runs=force_runs, segment_rows=segment_rows, slot_ranks=slot_ranks
    )
    if batch is not None:
        lora_add_(out, x, *stacked_pool(a, b, shuffle=0), batch)
    return out


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("tokens", [1, 5, 64, 300])
@pytest.mark.parametrize("case", [random_case, runs_case])
def test_blocked_equals_reference(seed, tokens, case):
    x, a, b, slots = case(seed, tokens, slots=5, rank=8)
    ref = lora_delta_reference(x, a, b, slots)
    for segment_rows in (None, 8, 1):  # blocks only; long runs in place; every run in place
        for force_runs in (False, True):
            assert torch.allclose(blocked_full(x, a, b, slots, 8, force_runs, segment_rows), ref, atol=1e-4)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("tokens", [1, 5, 64])
def test_per_token_layout_equals_reference(seed, tokens):
    """The layout CUDA graphs replay (torch's gather here; the Triton kernel on CUDA is checked by gpu_check)."""
    x, a, b, slots = random_case(seed, tokens, slots=5, rank=8)
    out = x.new_zeros(tokens, b.shape[-1])
    lora_add_(out, x, *stacked_pool(a, b, shuffle=seed), per_token_batch(torch.tensor(slots), 8))
    assert torch.allclose(out, lora_delta_reference(x, a, b, slots), atol=1e-4)


def test_runs_in_place_are_served_at_their_own_rank():
    """A run of >= 8 rows of one slot is a segment at that slot's rank; the rest go into blocks at their max rank."""
    x, a, b, _ = random_case(3, 0, slots=3, rank=16)
    ranks = [4, 16, 8]
    for slot, r in enumerate(ranks):
        a[slot, r:] = 0
        b[slot, r:] = 0
    x = torch.randn(30, a.shape[-1])
    token_slots = [0, 2, -1, 0] + [1] * 20 + [0] * 6  # rows 4..23 of slot 1 form the only long run
    batch = build_lora_batch(group_rows(token_slots), 16, "cpu", force_runs=True, slot_ranks=ranks)
    assert batch.segments == ((1, 4, 24, 16),) and batch.rank == 8  # blocks: slots 0 and 2 only
    out = x.new_zeros(30, b.shape[-1])
    lora_add_(out, x, *stacked_pool(a, b, shuffle=1), batch)
    assert torch.allclose(out, lora_delta_reference(x, a, b, token_slots), atol=1e-4)
    only_runs = build_lora_batch({0: list(range(10))}, 4, "cpu", force_runs=True, slot_ranks=ranks)
    assert only_runs.gather is None and only_runs.segments == ((0, 0, 10, 4),)


@pytest.mark.parametrize(
    "token_slots",
    [
        [0, 1, 2, 3] * 4,  # decode over many adapters, even counts
        sorted([0, 1, 2, 3] * 4),  # the same sorted by slot (as the runner does): x and y through views
        [4, -1, 2, 4, 2, 3, 4],  # uneven counts: pads are masked
        [1] * 300 + [0, 2],  # one long prefill
    ],
)
def test_blocks_equal_reference(token_slots):
    x, a, b, _ = random_case(1, len(token_slots), slots=8, rank=8)
    batch = build_lora_batch(group_rows(token_slots), 8, "cpu", segment_rows=None)
    if len(token_slots) == 16:  # the even decode: views exactly when the rows are sorted by slot
        assert (batch.dense is not None) == (token_slots == sorted(token_slots))
    out = x.new_zeros(x.shape[0], b.shape[-1])
    lora_add_(out, x, *stacked_pool(a, b, shuffle=2), batch)
    assert torch.allclose(out, lora_delta_reference(x, a, b, token_slots), atol=1e-4)


def test_rank_trim_is_exact_when_padding_is_zero():
    x, a, b, slots = random_case(0, 50, slots=3, rank=16)
    a[:, 6:, :] = 0
    b[:, 6:, :] = 0
    assert torch.allclose(blocked_full(x, a, b, slots, 6), lora_delta_reference(x, a, b, slots), atol=1e-4)


def test_matches_dense_w_plus_scaled_ba():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 24, generator=g)
    lora_a = torch.randn(4, 24, generator=g)  # PEFT layout [r, in]
    lora_b = torch.randn(40, 4, generator=g)  # [out, r]
    scale = 16 / 4
    x = torch.randn(7, 24, generator=g)
    a = torch.zeros(2, 8, 24)
    b = torch.zeros(2, 8, 40)
    a[1, :4, :] = lora_a
    b[1, :4, :] = (lora_b * scale).t()
    y = x @ w.t() + blocked_full(x, a, b, [1] * 7, 8)
    assert torch.allclose(y, x @ (w + scale * lora_b @ lora_a).t(), atol=1e-3)


def test_no_adapter_rows_means_no_batch():
    assert build_lora_batch({}, 8, "cpu") is None
    assert build_lora_batch({3: []}, 8, "cpu") is None


def test_block_size_choice():
    assert choose_block_size([1] * 64) == 1  # one token per adapter: gather per token
    assert choose_block_size([500]) >= 64  # one long prefill: big blocks
    assert choose_block_size([4] * 16) == 4


@pytest.mark.parametrize(
    ("token_slots", "in_place"),
    [
        ([0] * 64, [(0, 64)]),  # 64 decodes of one adapter: two matmuls instead of gather, bmm, bmm, scatter
        ([s for s in range(32) for _ in range(30)], []),  # equal runs on 32 slots: blocks of 32 serve them
        (sorted(s % 16 for s in range(1920)), []),  # 16 long prefills: the same
        (  # a serving step: decodes over many adapters, then prefill chunks: the chunks go in place
            sorted([*range(14), 0, 0, 1, 2]) + [s for s in (0, 9, 20) for _ in range(30)],
            [(18, 48), (48, 78), (78, 108)],
        ),
        ([0, 1, 2, 3] * 4, []),  # short runs never
    ],
)
def test_cost_model_picks_runs_in_place(token_slots, in_place):
    x, a, b, _ = random_case(2, len(token_slots), slots=32, rank=8)
    batch = build_lora_batch(group_rows(token_slots), 8, "cpu")
    assert sorted((lo, hi) for _, lo, hi, _ in batch.segments) == in_place
    out = x.new_zeros(x.shape[0], b.shape[-1])
    lora_add_(out, x, *stacked_pool(a, b, shuffle=3), batch)
    assert torch.allclose(out, lora_delta_reference(x, a, b, token_slots), atol=1e-4)
