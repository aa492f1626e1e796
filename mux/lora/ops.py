"""Pure-tensor multi-LoRA kernels and the per-step metadata they read.

The kernel used by the layers is `lora_delta_blocked`: tokens of the same slot are gathered into
fixed-size blocks, each block gathers its slot's A and B once, and two batched matmuls compute
`(x A) B` for all blocks at once. Tokens with no adapter are never touched, so a base-only batch
pays nothing. `lora_delta_reference` is the per-token loop every kernel is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_BLOCK_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)
_BLOCK_COST = 4  # cost of gathering one block's weights, in padded rows (measured order of magnitude)


@dataclass(frozen=True, slots=True)
class LoRABatch:
    """Which token rows use which slot this step; built once by the runner, read by every layer."""

    rows: torch.Tensor  # [M] int64 token rows that carry an adapter
    gather: torch.Tensor  # [N*blk] int64 token row for each padded position (pads repeat a real row)
    scatter: torch.Tensor  # [M] int64 padded position of each entry of `rows`
    block_slot: torch.Tensor  # [N] int64 slot of each block
    block_size: int
    rank: int  # largest rank among the slots in use (trailing rank columns are zero padding)


def choose_block_size(group_sizes: list[int]) -> int:
    def cost(blk: int) -> int:
        blocks = sum(-(-n // blk) for n in group_sizes)
        return blocks * blk + _BLOCK_COST * blocks

    return min(_BLOCK_SIZES, key=cost)


def build_lora_batch(groups: dict[int, list[int]], rank: int, device: torch.device | str) -> LoRABatch | None:
    """groups: slot -> token rows using it (base-only rows are left out). None when no row uses an adapter."""
    groups = {slot: rows for slot, rows in groups.items() if rows}
    if not groups:
        return None
    blk = choose_block_size([len(r) for r in groups.values()])
    rows: list[int] = []
    gather: list[int] = []
    scatter: list[int] = []
    block_slot: list[int] = []
    for slot, token_rows in groups.items():
        for start in range(0, len(token_rows), blk):
            chunk = token_rows[start : start + blk]
            base = len(gather)
            rows.extend(chunk)
            scatter.extend(range(base, base + len(chunk)))
            gather.extend(chunk + [chunk[0]] * (blk - len(chunk)))
            block_slot.append(slot)

    def t(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=device)

    return LoRABatch(t(rows), t(gather), t(scatter), t(block_slot), blk, rank)


def lora_delta_blocked(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, batch: LoRABatch) -> torch.Tensor:
    """x [T, in]; a [S, R, in]; b [S, R, out] -> delta [M, out] for the rows in batch.rows.

    Rank-major slots keep each slot's first r rows contiguous, so trimming the rank padding gathers fast.
    """
    r = batch.rank
    n = batch.block_slot.numel()
    xs = x.index_select(0, batch.gather).view(n, batch.block_size, -1)  # [N, blk, in]
    a_blk = a[:, :r, :].index_select(0, batch.block_slot)  # [N, r, in]
    b_blk = b[:, :r, :].index_select(0, batch.block_slot)  # [N, r, out]
    y = torch.bmm(torch.bmm(xs, a_blk.transpose(1, 2)), b_blk)  # [N, blk, out]
    return y.view(n * batch.block_size, -1).index_select(0, batch.scatter)  # [M, out]


def lora_delta_reference(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slots: list[int]) -> torch.Tensor:
    """x [T, in]; slots[t] = slot of token t or -1. Returns the full delta [T, out], one token at a time."""
    out = x.new_zeros(x.shape[0], b.shape[-1])
    for t, slot in enumerate(slots):
        if slot >= 0:
            out[t] = (a[slot] @ x[t]) @ b[slot]
    return out
