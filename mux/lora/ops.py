"""The multi-LoRA kernel and the per-step metadata it reads.

Every kernel reads the adapters from one pool of rank rows per layer, a [P+1, in] and b [P+1, out], through the
page table [S, R] (mux/lora/layers.py): rank k of slot s is row table[s, k], and ranks past a slot's own rank
point at the pool's last row, which is zeros. So each slot is read at its own rank wherever its pages lie.

On CUDA, decode steps use the per-token layout (`per_token_batch`): every row names its slot and the Triton
kernel (`mux/triton_ops.py`) reads that slot's rows in place; its shapes depend on the row count alone, so a
captured decode graph replays it for any mix of adapters. Without Triton the same layout gathers each row's
A and B in torch. On CPU float32 the C kernel (`mux/csrc/lora.c`, built by `mux/native.py`) serves the rows,
each at its slot's own rank: it was faster than the layouts below in every rank-8 scenario of
`python -m bench.lora_kernel`; in a step of at most FEW_ROWS rows each linear and its deltas are one C call
(`few_rows_linear_lora`, `python -m bench.small_linear`). Runs of >= 8 rows above rank 8 (prefill chunks of
larger adapters) keep the layouts below, where MKL beat it (same bench, the rank rows). Elsewhere (CUDA
prefills, other dtypes, no C compiler) `lora_add_` adds each token's `(x A_slot) B_slot` to the base output with
two batched matmuls: token rows are gathered into equal-size blocks (a size from `_BLOCK_SIZES`, picked by a
cost model), one slot per block, and each block's A and B gathered from the pool.

Before that, long runs of consecutive rows of one slot (a prefill chunk, or many decodes of one adapter) can
be served as segments: two matmuls on views of x and y and the slot's rows at its own rank, with no padding
or scatter, but two ops per run. The cost model takes the runs as segments when that is cheaper than blocking
their rows. The runner sorts rows by slot, so one slot's chunks form one run.

When the padded positions are exactly consecutive rows (rows sorted by slot, no pads), x and y are read and
written through views instead. Pad positions repeat a real row and are zeroed after the first matmul, so the
result is added back with one `index_add_` over the padded rows. Tokens with no adapter are never touched, so a
base-only batch pays nothing. `lora_delta_reference` is the per-token loop the kernel is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from mux import native, triton_ops
from mux.model.cpu import FEW_ROWS, PackedLinear

_BLOCK_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)
# Costs in padded token rows (≈4 µs per decoder layer each), read off `python -m bench.lora_kernel` on this machine:
_GATHER_COST = 4  # copying one block's A and B out of the pool
_BLOCKS_COST = 56  # the blocked kernel's fixed ops (gather x, two bmm, mask, scatter y)
_SEGMENT_COST = 32  # one run served in place (two matmul calls), on top of its rows
_SEGMENT_ROWS = 8  # shorter runs always go into blocks
NATIVE_ITEM_ROWS = 16  # the C kernel's work items: a long prefill run is split so both cores share it
# Runs of >= _SEGMENT_ROWS rows of a slot above this rank get torch's layouts even with the C kernel. 16 prefills of
# 30 tokens, ms per step (`python -m bench.lora_kernel`, rank rows, 2026-12-04, the kernel serving 4 rows a pass):
# torch 97 vs C 146 at rank 32, 51 vs 68 at 16; at rank 8 C won, 36 vs 39. Decodes (4 rows a slot) stay in C at
# every rank (42.3 vs 42.4 at rank 32).
NATIVE_MAX_RUN_RANK = 8


@dataclass(frozen=True, slots=True)
class NativeRows:
    """One step's rows for the C kernel, as work items of at most NATIVE_ITEM_ROWS rows of one slot."""

    tensors: tuple[torch.Tensor, ...]  # slot [I], rank [I], off [I+1], rows [N] int64: kept alive for the pointers
    pointers: tuple[int, int, int, int]
    items: int


def native_rows(groups: dict[int, list[int]], ranks: dict[int, int]) -> NativeRows:
    """groups: slot -> its rows; ranks: slot -> the rank to compute at (trailing rank rows are zero padding)."""
    slot, rank, off, rows = [], [], [0], []
    for s, rs in groups.items():
        for i in range(0, len(rs), NATIVE_ITEM_ROWS):
            rows += rs[i : i + NATIVE_ITEM_ROWS]
            slot.append(s)
            rank.append(ranks[s])
            off.append(len(rows))
    tensors = tuple(torch.tensor(v, dtype=torch.int64) for v in (slot, rank, off, rows))
    return NativeRows(tensors, tuple(t.data_ptr() for t in tensors), len(slot))


@dataclass(frozen=True, slots=True)
class RowSlots:
    """A step of at most FEW_ROWS rows on the C kernels: each row's slot (-1: none) and rank, for the fused
    few-row linear (`few_rows_linear_lora`)."""

    tensor: torch.Tensor  # [2, T] int64: slot, rank of each row; kept alive for the pointers
    pointers: tuple[int, int]
    rows: int


def row_slots(groups: dict[int, list[int]], ranks: dict[int, int], rows: int) -> RowSlots:
    slot = [-1] * rows
    for s, rs in groups.items():
        for row in rs:
            slot[row] = s
    table = torch.tensor([slot, [ranks.get(s, 0) for s in slot]], dtype=torch.int64)  # [2, T]
    return RowSlots(table, (table[0].data_ptr(), table[1].data_ptr()), rows)


@dataclass(frozen=True, slots=True)
class LoRABatch:
    """Which token rows use which slot this step; built once by the runner, read by every layer."""

    segments: tuple[tuple[int, int, int, int], ...]  # (slot, first row, end row, rank): runs served in place
    gather: torch.Tensor | None  # [N*blk] int64 token row of each padded position (pads repeat a real row)
    dense: tuple[int, int] | None  # (first, end) when the padded positions are exactly rows first..end-1
    mask: torch.Tensor | None  # [N, blk, 1] 1 at real positions, 0 at pads (None: no pads)
    block_slot: torch.Tensor | None  # [N] int64 slot of each block
    block_size: int
    rank: int  # largest rank among the blocks' slots (trailing rank columns are zero padding)
    native: NativeRows | None = None  # rows the C kernel serves (the segments and blocks serve the others)
    token_slots: torch.Tensor | None = None  # [T] int64 slot of every row, -1 for none: the per-token layout
    layers: frozenset[int] | None = None  # indices of the wrapped linears some slot targets (None: all)
    few: RowSlots | None = None  # a step of <= FEW_ROWS rows: each linear and its deltas in one C call

    def targets(self, index: int) -> bool:
        """Whether some adapter of this step targets the wrapped linear `index` (else its delta is exactly zero)."""
        return self.layers is None or index in self.layers


def per_token_batch(token_slots: torch.Tensor, rank: int, layers: frozenset[int] | None = None) -> LoRABatch:
    """The per-token layout: every row reads its own slot's weights (the Triton kernel on CUDA, else a gather).
    Its shapes depend on the row count alone, so a captured CUDA graph replays it for any slots."""
    return LoRABatch((), None, None, None, None, 0, rank, token_slots=token_slots, layers=layers)


def gathered_cost(counts: list[int], blk: int) -> int:
    blocks = sum(-(-n // blk) for n in counts)
    return blocks * blk + _GATHER_COST * blocks


def choose_block_size(counts: list[int]) -> int:
    return min(_BLOCK_SIZES, key=lambda blk: gathered_cost(counts, blk))


def build_lora_batch(
    groups: dict[int, list[int]],
    rank: int,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
    force_runs: bool = False,
    slot_ranks: list[int] | None = None,
    segment_rows: int | None = _SEGMENT_ROWS,
    use_native: bool = False,
    rows: int | None = None,
) -> LoRABatch | None:
    """groups: slot -> token rows using it, ascending (base-only rows are left out). None when no row uses an
    adapter. rank: the largest rank among the groups' slots; slot_ranks[slot]: each slot's own (default: rank).

    force_runs: every run of at least `segment_rows` rows as a segment (benchmarks, tests); else the cost model
    picks the runs. segment_rows=None: every row in blocks.
    rows: the step's row count, given to fuse each linear with its deltas when it is at most FEW_ROWS (with
    use_native; the C kernel still serves a linear that cannot take the fused call).
    """
    groups = {slot: rows for slot, rows in groups.items() if rows}
    if not groups:
        return None
    if use_native:
        ranks = {slot: rank if slot_ranks is None else slot_ranks[slot] for slot in groups}
        runs = [
            (slot, lo, hi)
            for slot, rows in groups.items()
            if ranks[slot] > NATIVE_MAX_RUN_RANK
            for lo, hi in _runs(rows)
            if hi - lo >= _SEGMENT_ROWS
        ]
        rest = _without(groups, runs)
        native_part = native_rows(rest, ranks) if rest else None
        if not runs:
            few = row_slots(groups, ranks, rows) if rows is not None and rows <= FEW_ROWS else None
            return LoRABatch((), None, None, None, None, 0, rank, native_part, few=few)
        long: dict[int, list[int]] = {}
        for slot, lo, hi in runs:
            long.setdefault(slot, []).extend(range(lo, hi))
        long_rank = max(ranks[slot] for slot in long)
        torch_part = build_lora_batch(long, long_rank, device, dtype, force_runs, slot_ranks, segment_rows)
        return replace(torch_part, native=native_part)  # torch's layouts for the long runs, C for the rest
    segments: list[tuple[int, int, int, int]] = []
    if segment_rows is not None:
        runs = [(slot, lo, hi) for slot, rows in groups.items() for lo, hi in _runs(rows) if hi - lo >= segment_rows]
        if not force_runs:  # the cost model picks which runs (the longest ones first) to serve in place
            runs = _runs_in_place(groups, runs)
        for slot, lo, hi in runs:
            segments.append((slot, lo, hi, rank if slot_ranks is None else slot_ranks[slot]))
        groups = _without(groups, runs)
        if not groups:
            return LoRABatch(tuple(segments), None, None, None, None, 0, 0)
        if slot_ranks is not None:
            rank = max(slot_ranks[slot] for slot in groups)
    counts = {slot: len(rows) for slot, rows in groups.items()}
    blk = choose_block_size(list(counts.values()))
    chunks = [(slot, rows[i : i + blk]) for slot, rows in groups.items() for i in range(0, len(rows), blk)]
    pad_row = next(iter(groups.values()))[0]
    gather: list[int] = []
    real: list[float] = []
    for _, rows in chunks:
        gather += rows + [pad_row] * (blk - len(rows))
        real += [1.0] * len(rows) + [0.0] * (blk - len(rows))
    mask = None if all(real) else torch.tensor(real, dtype=dtype, device=device).view(len(chunks), blk, 1)
    block_slot = torch.tensor([s for s, _ in chunks], dtype=torch.int64, device=device)
    gather_t = torch.tensor(gather, dtype=torch.int64, device=device)
    dense = (gather[0], gather[-1] + 1) if gather == list(range(gather[0], gather[0] + len(gather))) else None
    return LoRABatch(tuple(segments), gather_t, dense, mask, block_slot, blk, rank)


def blocks_cost(counts: dict[int, int]) -> int:
    """The cheaper blocked layout for these rows per slot, in padded rows (0: no rows)."""
    if not counts:
        return 0
    sizes = list(counts.values())
    return _BLOCKS_COST + gathered_cost(sizes, choose_block_size(sizes))


def _runs_in_place(groups: dict[int, list[int]], runs: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """The runs worth serving in place: the cheapest of 'none' and 'every run at least L long' over each L."""
    counts = {slot: len(rows) for slot, rows in groups.items()}
    best, best_cost = [], blocks_cost(counts)
    runs = sorted(runs, key=lambda r: r[1] - r[2])  # longest first
    rows = 0
    for i, (slot, lo, hi) in enumerate(runs):
        counts[slot] -= hi - lo
        rows += hi - lo
        if counts[slot] == 0:
            del counts[slot]
        if i + 1 < len(runs) and runs[i + 1][2] - runs[i + 1][1] == hi - lo:
            continue  # runs of equal length go in place together
        cost = rows + _SEGMENT_COST * (i + 1) + blocks_cost(counts)
        if cost < best_cost:
            best, best_cost = runs[: i + 1], cost
    return best


def _without(groups: dict[int, list[int]], runs: list[tuple[int, int, int]]) -> dict[int, list[int]]:
    """groups minus the rows of `runs`, slots left with no row dropped."""
    if not runs:
        return groups
    taken: dict[int, set[int]] = {}
    for slot, lo, hi in runs:
        taken.setdefault(slot, set()).update(range(lo, hi))
    out = {slot: [r for r in rows if r not in taken.get(slot, ())] for slot, rows in groups.items()}
    return {slot: rows for slot, rows in out.items() if rows}


def _runs(rows: list[int]) -> list[tuple[int, int]]:
    """Ascending rows -> [(first, end)) of each run of consecutive rows."""
    runs = []
    lo = prev = rows[0]
    for row in rows[1:]:
        if row != prev + 1:
            runs.append((lo, prev + 1))
            lo = row
        prev = row
    runs.append((lo, prev + 1))
    return runs


def lora_add_(
    y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, table: torch.Tensor, batch: LoRABatch
) -> None:
    """y [T, out] += (x A_slot) B_slot for the rows in the batch; x [T, in]; the pools a [P, in], b [P, out];
    table [S, R] int64: the pool row of each slot's rank k."""
    if batch.token_slots is not None:
        if triton_ops.serves(y.device):
            triton_ops.lora_add(y, x, a, b, table, batch.token_slots, batch.rank)
        else:
            _per_token_add_(y, x, a, b, table, batch.token_slots, batch.rank)
        return
    for slot, lo, hi, rank in batch.segments:
        rows = table[slot, :rank]  # [r]
        y[lo:hi].addmm_(x[lo:hi] @ a.index_select(0, rows).T, b.index_select(0, rows))  # [n, in] @ [in, r] @ [r, out]
    if batch.native is not None:
        _native_lora_add(y, x, a, b, table, batch.native)
    if batch.gather is None:
        return
    r, blk = batch.rank, batch.block_size
    if batch.dense is not None:  # rows sorted by slot, no pads (e.g. equal decodes per adapter): views, no copy
        first, end = batch.dense
        xs = x[first:end].view(-1, blk, x.shape[1])  # [N, blk, in]
    else:
        xs = x.index_select(0, batch.gather).view(-1, blk, x.shape[1])  # [N, blk, in]
    a_blk, b_blk = _gather_slots(a, b, table[:, :r].index_select(0, batch.block_slot))  # [N, r, in], [N, r, out]
    h = torch.bmm(xs, a_blk.transpose(1, 2))  # [N, blk, r]
    if batch.mask is not None:
        h.mul_(batch.mask)
    if batch.dense is not None:
        y[first:end].view(-1, blk, b.shape[-1]).baddbmm_(h, b_blk)
    else:
        y.index_add_(0, batch.gather, torch.bmm(h, b_blk).view(-1, b.shape[-1]))


def _gather_slots(a: torch.Tensor, b: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """rows [N, r] pool rows -> A [N, r, in], B [N, r, out] copied out of the pools."""
    flat = rows.reshape(-1)
    return a.index_select(0, flat).view(*rows.shape, -1), b.index_select(0, flat).view(*rows.shape, -1)


def _per_token_add_(y, x, a, b, table, slots: torch.Tensor, rank: int) -> None:
    """The per-token layout in torch: each row's A and B gathered out of the pools (rows with slot -1 add
    zero)."""
    live = (slots >= 0).to(x.dtype)[:, None, None]  # [T, 1, 1]
    a_t, b_t = _gather_slots(a, b, table[:, :rank].index_select(0, slots.clamp(min=0)))  # [T, r, in], [T, r, out]
    h = torch.bmm(x[:, None, :], a_t.transpose(1, 2)).mul_(live)  # [T, 1, r]
    y.view(-1, 1, b.shape[-1]).baddbmm_(h, b_t)


def few_rows_linear_lora(
    base: torch.nn.Module, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, table: torch.Tensor, rows: RowSlots
) -> torch.Tensor | None:
    """base(x) plus each row's (x A_slot) B_slot in one C call (`mux_linear_lora`, bitwise the two calls it
    replaces: one Python round and one parallel region fewer per linear), when `base` is a packed linear whose pick
    for this row count is a C kernel and x [..., in] is contiguous with the step's rows (mux/model/cpu.py); else
    None."""
    if not (isinstance(base, PackedLinear) and x.is_contiguous()):
        return None
    k, n = base.in_features, base.out_features
    if x.shape[-1] != k or x.numel() != rows.rows * k or (c := base.c_kernel(rows.rows, fused=True)) is None:
        return None
    fn, panels = c
    y = x.new_empty(*x.shape[:-1], n)  # [..., out]
    bias = None if base.bias is None else base.bias.data_ptr()
    fn(
        x.data_ptr(), k, y.data_ptr(), n, panels, bias, rows.rows, k, n,
        a.data_ptr(), b.data_ptr(), table.data_ptr(), table.shape[1], *rows.pointers,
    )  # fmt: skip
    return y


def _native_lora_add(y, x, a, b, table: torch.Tensor, rows: NativeRows) -> None:
    if x.stride(1) != 1:
        x = x.contiguous()
    assert y.stride(1) == 1 and a.is_contiguous() and b.is_contiguous() and x.dtype == y.dtype == torch.float32
    native.library().mux_lora_add(
        x.data_ptr(), x.stride(0), y.data_ptr(), y.stride(0), a.data_ptr(), b.data_ptr(), table.data_ptr(),
        table.shape[1], a.shape[1], b.shape[1], *rows.pointers, rows.items,
    )  # fmt: skip


def lora_delta_reference(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slots: list[int]) -> torch.Tensor:
    """x [T, in]; a [S, R, in], b [S, R, out] one slot's weights each; slots[t] = slot of token t or -1. Returns
    the full delta [T, out], one token at a time."""
    out = x.new_zeros(x.shape[0], b.shape[-1])
    for t, slot in enumerate(slots):
        if slot >= 0:
            out[t] = (a[slot] @ x[t]) @ b[slot]
    return out


def stacked_pool(a: torch.Tensor, b: torch.Tensor, shuffle: int | None = None):
    """Slot stacks a [S, R, in], b [S, R, out] as pools with their table [S, R], for the benchmarks and tests
    that build slots directly: slot s's rank k at row s·R + k, or (shuffle: a seed) at a random row, as the
    pages of a long-running pool lie. -> (a [S·R, in], b [S·R, out], table)."""
    slots, rank = a.shape[:2]
    order = torch.arange(slots * rank)
    if shuffle is not None:
        order = torch.randperm(slots * rank, generator=torch.Generator().manual_seed(shuffle))
    pool_a, pool_b = (t.reshape(slots * rank, -1).clone() for t in (a, b))
    pool_a[order], pool_b[order] = a.reshape(slots * rank, -1), b.reshape(slots * rank, -1)
    return pool_a, pool_b, order.view(slots, rank).to(a.device)
