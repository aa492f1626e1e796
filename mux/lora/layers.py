"""MultiLoRALinear, the wrapping of a base model's linear layers into LoRA layers, and their paged adapter pool."""

from __future__ import annotations

import torch
from torch import nn

from mux import native
from mux.lora.adapter import LoRAWeights, ModuleShape
from mux.lora.ops import LoRABatch, few_rows_linear_lora, lora_add_

PAGE_RANKS = 4  # a page of the pool: this many rank rows of every wrapped linear's A and B
DEFAULT_ADAPTER_RANK = 16  # the default pool holds max_loras adapters of this rank (as its slots did before)


class LoRAContext:
    """What the layers share: this step's LoRA metadata (None = no adapter rows) and the pool's page table."""

    __slots__ = ("batch", "table")

    def __init__(self, table: torch.Tensor) -> None:
        self.batch: LoRABatch | None = None
        self.table = table  # [S, R] int64: the pool row of each slot's rank k; the zero row past its rank


class MultiLoRALinear(nn.Module):
    """y = base(x) + (x A_slotᵀ) B_slot for each token's slot; A and B·scale live in one pool of rank rows.

    lora_a [P+1, in] and lora_b [P+1, out]: row table[slot, k] is rank k of a slot; row P is zeros.
    """

    def __init__(self, base: nn.Linear, rows: int, ctx: LoRAContext, index: int = 0) -> None:
        super().__init__()
        self.base = base
        self.index = index  # among the model's wrapped linears: LoRABatch.layers names the ones a step uses
        self.in_features = base.in_features
        self.out_features = base.out_features
        w = base.weight
        self.register_buffer("lora_a", w.new_zeros(rows + 1, self.in_features), persistent=False)
        self.register_buffer("lora_b", w.new_zeros(rows + 1, self.out_features), persistent=False)
        self.ctx = ctx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, table = self.ctx.batch, self.ctx.table
        if batch is None or not batch.targets(self.index):
            return self.base(x)
        if (
            batch.few is not None
            and (y := few_rows_linear_lora(self.base, x, self.lora_a, self.lora_b, table, batch.few)) is not None
        ):
            return y
        y = self.base(x)
        rows = x.reshape(-1, self.in_features)
        lora_add_(y.view(-1, self.out_features), rows, self.lora_a, self.lora_b, table, batch)
        return y


def pages_for(rank: int) -> int:
    return -(-rank // PAGE_RANKS)


class MultiLoRAModel:
    """Owns the MultiLoRALinear layers of one base model and their pool: an adapter of rank r takes
    pages_for(r) pages, anywhere in the pool (its slot's row of the page table says where), so any adapter that
    fits the free pages loads, whatever the order of earlier loads and evictions."""

    def __init__(
        self,
        model: nn.Module,
        max_loras: int,
        max_rank: int,
        pool_bytes: int | None = None,
        use_native: bool = True,
        fused_few_rows: bool = True,
    ) -> None:
        linears = targetable_linears(model)
        weight = next(iter(linears.values())).weight
        self.dtype, self.device = weight.dtype, weight.device
        self.rank_bytes = sum(m.in_features + m.out_features for m in linears.values()) * weight.element_size()
        self.page_bytes = PAGE_RANKS * self.rank_bytes
        if pool_bytes is None:
            pool_bytes = max_loras * DEFAULT_ADAPTER_RANK * self.rank_bytes
        self.num_pages = pool_bytes // self.page_bytes
        if self.num_pages < 1:
            raise ValueError(f"max_lora_bytes {pool_bytes} holds no page of {self.page_bytes} bytes for this model")
        self.max_rank = max_rank
        self.zero_row = self.num_pages * PAGE_RANKS
        # every adapter takes at least one page, so num_pages slots are never short
        table = torch.full((self.num_pages, max_rank), self.zero_row, dtype=torch.int64, device=self.device)
        self.ctx = LoRAContext(table)  # [S, R]
        self.layers: dict[str, MultiLoRALinear] = {}
        self.slot_rank = [0] * self.num_pages
        self.slot_layers: list[frozenset[int]] = [frozenset()] * self.num_pages  # wrapped linears each targets
        self._layer_sets: dict[tuple[int, ...], frozenset[int]] = {}  # per-layer ranks -> one shared set
        self._plans: dict[tuple, tuple[tuple[int, ...], list[tuple[int, int]]]] = {}
        for index, (name, module) in enumerate(linears.items()):
            layer = MultiLoRALinear(module, self.zero_row, self.ctx, index)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, layer)
            self.layers[name] = layer
        self.shapes = {n: ModuleShape(m.in_features, m.out_features) for n, m in self.layers.items()}
        self.native = use_native and native.serves(self.device, self.dtype)  # the C kernel serves LoRA rows
        self.fused_few_rows = self.native and fused_few_rows  # a few-row step's linears with their deltas, in C

    def load(self, slot: int, pages: tuple[int, ...], weights: LoRAWeights) -> None:
        """Copy A [r, in] and B·s [r, out] of every targeted module into `pages` (pages_for(rank) of them) and
        point `slot`'s table row at them; zero the pages' rows no module fills.

        On CPU float32 one C call copies the pieces on the thread team: a SmolLM2 rank-8 adapter in 1.1 ms, against
        2.7-2.9 ms for one batched torch copy (torch._foreach_copy_: each small copy on one thread) and 0.6 ms for
        a single copy of its buffer (ad hoc, the engine's thread). Elsewhere the batched copy. The padding is
        zeroed in one batched call.
        """
        ranks, sources = self._plan(weights.layout)
        item = weights.buffer.element_size()
        dst, src, zero = [], [], []  # (pool, first row, rows) of each piece, its buffer offset; rows to zero
        for (layer, r), (a_at, b_at) in zip(zip(self.layers.values(), ranks, strict=True), sources, strict=True):
            for pool, at in ((layer.lora_a, a_at), (layer.lora_b, b_at)):
                width = pool.shape[1]
                for g, page in enumerate(pages):
                    row, n = page * PAGE_RANKS, max(0, min(PAGE_RANKS, r - g * PAGE_RANKS))
                    if n:
                        dst.append((pool, row, n))
                        src.append(at + g * PAGE_RANKS * width)
                    if n < PAGE_RANKS:
                        zero.append(pool[row + n : row + PAGE_RANKS])
        if dst and self.native and weights.buffer.device.type == "cpu" and weights.buffer.dtype == self.dtype:
            arrays = [
                torch.tensor([p.data_ptr() + row * p.shape[1] * item for p, row, _ in dst], dtype=torch.int64),
                torch.tensor([off * item for off in src], dtype=torch.int64),
                torch.tensor([n * p.shape[1] * item for p, _, n in dst], dtype=torch.int64),
            ]
            dst_at, src_at, nbytes = (t.data_ptr() for t in arrays)
            native.library().mux_copy_pieces(dst_at, weights.buffer.data_ptr(), src_at, nbytes, len(dst))
        elif dst:
            flat = weights.buffer
            views = [p[row : row + n].view(-1) for p, row, n in dst]
            torch._foreach_copy_(views, [flat[o : o + v.numel()] for o, v in zip(src, views, strict=True)])
        if zero:
            torch._foreach_zero_(zero)
        rows = [pages[k // PAGE_RANKS] * PAGE_RANKS + k % PAGE_RANKS for k in range(weights.rank)]
        row = torch.tensor(rows + [self.zero_row] * (self.max_rank - len(rows)), dtype=torch.int64)
        self.ctx.table[slot].copy_(row, non_blocking=True)
        self.slot_rank[slot] = weights.rank
        if (layers := self._layer_sets.get(ranks)) is None:
            layers = self._layer_sets[ranks] = frozenset(i for i, r in enumerate(ranks) if r)
        self.slot_layers[slot] = layers

    def rows(self, slot: int, r: int) -> torch.Tensor:
        """The pool rows of a slot's ranks [:r] (to copy an adapter back out)."""
        return self.ctx.table[slot, :r]

    def layers_of(self, slots) -> frozenset[int] | None:
        """The wrapped linears any of these slots targets; None when that is all of them (nothing to skip).
        Slots of one adapter layout share one set object, so the union is over a few distinct sets."""
        distinct = {self.slot_layers[slot] for slot in slots if slot >= 0}
        used = next(iter(distinct)) if len(distinct) == 1 else frozenset().union(*distinct)
        return None if len(used) == len(self.layers) else used

    def _plan(self, layout: tuple) -> tuple[tuple[int, ...], list[tuple[int, int]]]:
        """For one adapter layout: each layer's rank and the buffer offsets of its A and B. Made once per layout
        (adapters of one shape share it)."""
        if (plan := self._plans.get(layout)) is None:
            if len(self._plans) >= 64:
                self._plans.clear()
            by_name = {m: (r, a, b) for m, r, _, _, a, b in layout}
            entries = [by_name.get(name, (0, 0, 0)) for name in self.layers]
            plan = self._plans[layout] = (tuple(r for r, _, _ in entries), [(a, b) for _, a, b in entries])
        return plan


def targetable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear inside the decoder layers, named as PEFT names them (relative to the CausalLM)."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and ".layers." in f".{name}"
    }
