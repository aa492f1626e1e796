"""Pure-tensor multi-LoRA kernel and the per-step metadata it reads.

`lora_add_` adds each token's `(x A_slot) B_slot` to the base output with two batched matmuls. Token rows are
gathered into equal-size blocks, one slot per block, in one of two layouts chosen per step by a cost model:

- gathered: blocks of a size from `_BLOCK_SIZES`; each block's A and B are gathered (copied) from the slot
  stacks. Best when a few slots carry many tokens (long prefills) or the slots in use are scattered.
- wave: one block per slot over the range of slots in use, as large as the busiest slot; A and B are read in
  place (a slice of the stacks, no copy). Best for decode steps over many adapters with a few tokens each,
  where copying the weights costs more than the matmuls.

Pad positions repeat a real row and are zeroed after the first matmul, so the result is added back with one
`index_add_` over the padded rows. A wave also reads slots in its range that no token uses this step, possibly
while the loader overwrites them: their rows are pads, and slot weights are always finite (adapters with
non-finite values are refused at load), so they add exactly zero. Tokens with no adapter are never touched, so
a base-only batch pays nothing. `lora_delta_reference` is the per-token loop the kernel is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_BLOCK_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)
# Costs in padded token rows, orders of magnitude read off `python -m bench.lora_kernel` on this machine:
_GATHER_COST = 4  # copying one block's A and B out of the slot stacks
_READ_COST = 1  # reading one slot's A and B in place (a wave block, used or not)


@dataclass(frozen=True, slots=True)
class LoRABatch:
    """Which token rows use which slot this step; built once by the runner, read by every layer."""

    gather: torch.Tensor  # [N*blk] int64 token row of each padded position (pads repeat a real row)
    mask: torch.Tensor | None  # [N, blk, 1] 1 at real positions, 0 at pads (None: no pads)
    block_slot: torch.Tensor | None  # [N] int64 slot of each block (gathered layout)
    wave: tuple[int, int] | None  # (lo, hi): block i is slot lo + i, weights read in place (wave layout)
    block_size: int
    rank: int  # largest rank among the slots in use (trailing rank columns are zero padding)


def gathered_cost(counts: list[int], blk: int) -> int:
    blocks = sum(-(-n // blk) for n in counts)
    return blocks * blk + _GATHER_COST * blocks


def wave_cost(counts: dict[int, int]) -> int:
    width = max(counts) - min(counts) + 1
    return width * max(counts.values()) + _READ_COST * width


def choose_block_size(counts: list[int]) -> int:
    return min(_BLOCK_SIZES, key=lambda blk: gathered_cost(counts, blk))


def build_lora_batch(
    groups: dict[int, list[int]],
    rank: int,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
    layout: str | None = None,
) -> LoRABatch | None:
    """groups: slot -> token rows using it (base-only rows are left out). None when no row uses an adapter.

    layout: "wave" or "gathered" to force one (benchmarks, tests); None lets the cost model choose.
    """
    if layout not in (None, "wave", "gathered"):
        raise ValueError(f"unknown LoRA layout {layout!r} (wave, gathered or None)")
    groups = {slot: rows for slot, rows in groups.items() if rows}
    if not groups:
        return None
    counts = {slot: len(rows) for slot, rows in groups.items()}
    blk = choose_block_size(list(counts.values()))
    wave = None
    if layout == "wave" or (layout is None and wave_cost(counts) < gathered_cost(list(counts.values()), blk)):
        wave, blk = (min(groups), max(groups) + 1), max(counts.values())
        chunks = [(slot, groups.get(slot, [])) for slot in range(*wave)]
    else:
        chunks = [(slot, rows[i : i + blk]) for slot, rows in groups.items() for i in range(0, len(rows), blk)]
    pad_row = next(iter(groups.values()))[0]
    gather: list[int] = []
    real: list[float] = []
    for _, rows in chunks:
        gather += rows + [pad_row] * (blk - len(rows))
        real += [1.0] * len(rows) + [0.0] * (blk - len(rows))
    mask = None if all(real) else torch.tensor(real, dtype=dtype, device=device).view(len(chunks), blk, 1)
    block_slot = None if wave else torch.tensor([s for s, _ in chunks], dtype=torch.int64, device=device)
    return LoRABatch(torch.tensor(gather, dtype=torch.int64, device=device), mask, block_slot, wave, blk, rank)


def lora_add_(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, batch: LoRABatch) -> None:
    """y [T, out] += (x A_slot) B_slot for the rows in the batch; x [T, in]; a [S, R, in]; b [S, R, out].

    Rank-major slots keep each slot's first r rows contiguous, so trimming the rank padding reads fast.
    """
    r, blk = batch.rank, batch.block_size
    xs = x.index_select(0, batch.gather).view(-1, blk, x.shape[1])  # [N, blk, in]
    if batch.wave is not None:
        lo, hi = batch.wave
        a_blk, b_blk = a[lo:hi, :r], b[lo:hi, :r]  # [N, r, in], [N, r, out]: views, no copy
    else:
        a_blk = a[:, :r].index_select(0, batch.block_slot)  # [N, r, in]
        b_blk = b[:, :r].index_select(0, batch.block_slot)  # [N, r, out]
    h = torch.bmm(xs, a_blk.transpose(1, 2))  # [N, blk, r]
    if batch.mask is not None:
        h.mul_(batch.mask)
    y.index_add_(0, batch.gather, torch.bmm(h, b_blk).view(-1, b.shape[-1]))


def lora_delta_reference(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slots: list[int]) -> torch.Tensor:
    """x [T, in]; slots[t] = slot of token t or -1. Returns the full delta [T, out], one token at a time."""
    out = x.new_zeros(x.shape[0], b.shape[-1])
    for t, slot in enumerate(slots):
        if slot >= 0:
            out[t] = (a[slot] @ x[t]) @ b[slot]
    return out
