"""MultiLoRALinear and the wrapping of a base model's linear layers into slot-stacked LoRA layers."""

from __future__ import annotations

import torch
from torch import nn

from mux import native
from mux.lora.adapter import LoRAWeights, ModuleShape
from mux.lora.ops import LoRABatch, few_rows_linear_lora, lora_add_


class LoRAContext:
    """The one mutable object the layers share: this step's LoRA metadata (None = no adapter rows)."""

    __slots__ = ("batch",)

    def __init__(self) -> None:
        self.batch: LoRABatch | None = None


class MultiLoRALinear(nn.Module):
    """y = base(x) + (x A_slotᵀ) B_slot for each token's slot; A and B·scale live in preallocated slot stacks.

    lora_a [S, R, in] and lora_b [S, R, out]: rank-major, zero-padded past each adapter's rank.
    """

    def __init__(self, base: nn.Linear, num_slots: int, max_rank: int, ctx: LoRAContext, index: int = 0) -> None:
        super().__init__()
        self.base = base
        self.index = index  # among the model's wrapped linears: LoRABatch.layers names the ones a step uses
        self.in_features = base.in_features
        self.out_features = base.out_features
        w = base.weight
        self.register_buffer("lora_a", w.new_zeros(num_slots, max_rank, self.in_features), persistent=False)
        self.register_buffer("lora_b", w.new_zeros(num_slots, max_rank, self.out_features), persistent=False)
        self.ctx = ctx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = self.ctx.batch
        if batch is None or not batch.targets(self.index):
            return self.base(x)
        if (
            batch.few is not None
            and (y := few_rows_linear_lora(self.base, x, self.lora_a, self.lora_b, batch.few)) is not None
        ):
            return y
        y = self.base(x)
        lora_add_(y.view(-1, self.out_features), x.reshape(-1, self.in_features), self.lora_a, self.lora_b, batch)
        return y

    def slot_views(self, slot: int, r: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(the rows [:r] of A and B to fill, the rows [r:] that must be zero) for one slot."""
        a, b = self.lora_a[slot], self.lora_b[slot]
        fill = [a[:r], b[:r]] if r else []
        zero = [a[r:], b[r:]] if r < a.shape[0] else []
        return fill, zero


class MultiLoRAModel:
    """Owns the MultiLoRALinear layers of one base model and fills their slots."""

    def __init__(
        self, model: nn.Module, num_slots: int, max_rank: int, use_native: bool = True, fused_few_rows: bool = True
    ) -> None:
        self.ctx = LoRAContext()
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.layers: dict[str, MultiLoRALinear] = {}
        self.slot_rank = [0] * num_slots
        self.slot_layers: list[frozenset[int]] = [frozenset()] * num_slots  # wrapped linears each slot targets
        self._layer_sets: dict[tuple[int, ...], frozenset[int]] = {}  # per-layer ranks -> one shared set
        self._view_cache: dict[tuple[int, tuple[int, ...]], tuple[list, list]] = {}
        self._plans: dict[tuple, tuple[tuple[int, ...], list[int], list[int], list[int]]] = {}
        self._copy_plans: dict[tuple, tuple] = {}  # (slot, layout) -> (arrays, (their pointers, count))
        for index, (name, module) in enumerate(targetable_linears(model).items()):
            layer = MultiLoRALinear(module, num_slots, max_rank, self.ctx, index)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, layer)
            self.layers[name] = layer
        self.shapes = {n: ModuleShape(m.in_features, m.out_features) for n, m in self.layers.items()}
        weight = next(iter(self.layers.values())).base.weight
        self.dtype, self.device = weight.dtype, weight.device
        self.native = use_native and native.serves(self.device, self.dtype)  # the C kernel serves LoRA rows
        self.fused_few_rows = self.native and fused_few_rows  # a few-row step's linears with their deltas, in C

    def load(self, slot: int, weights: LoRAWeights) -> None:
        """Copy A [r, in] and B·s [r, out] of every targeted module into `slot`; zero everything else.

        On CPU float32 one C call copies the pieces on the thread team: a SmolLM2 rank-8 adapter in 1.1 ms, against
        2.7-2.9 ms for one batched torch copy (torch._foreach_copy_: each small copy on one thread) and 0.6 ms for
        a single copy of its buffer (ad hoc, the engine's thread). Elsewhere the batched copy, its sources one
        split of the adapter's buffer. The padding is zeroed in one batched call.
        """
        ranks, order, sizes, _ = self._plan(weights.layout)
        dst, zero = self._views(slot, ranks)
        if dst and self.native and weights.buffer.device.type == "cpu" and weights.buffer.dtype == self.dtype:
            pointers, n = self._copy_plan(slot, weights.layout)
            native.library().mux_copy_pieces(pointers[0], weights.buffer.data_ptr(), pointers[1], pointers[2], n)
        elif dst:
            parts = weights.buffer.split(sizes)
            torch._foreach_copy_(dst, [parts[i] for i in order], non_blocking=True)
        if zero:
            torch._foreach_zero_(zero)
        self.slot_rank[slot] = weights.rank
        if (layers := self._layer_sets.get(ranks)) is None:
            layers = self._layer_sets[ranks] = frozenset(i for i, r in enumerate(ranks) if r)
        self.slot_layers[slot] = layers

    def layers_of(self, slots) -> frozenset[int] | None:
        """The wrapped linears any of these slots targets; None when that is all of them (nothing to skip).
        Slots of one adapter layout share one set object, so the union is over a few distinct sets."""
        distinct = {self.slot_layers[slot] for slot in slots if slot >= 0}
        used = next(iter(distinct)) if len(distinct) == 1 else frozenset().union(*distinct)
        return None if len(used) == len(self.layers) else used

    def _copy_plan(self, slot: int, layout: tuple) -> tuple[tuple[int, int, int], int]:
        """For the C copy: (pointers to the destination addresses, the source byte offsets and the byte counts of
        the pieces, in destination order), their count. Made once per (slot, layout); the arrays live in the cache."""
        key = (slot, layout)
        if (entry := self._copy_plans.get(key)) is None:
            if len(self._copy_plans) >= 4 * self.num_slots:
                self._copy_plans.clear()
            ranks, order, _, offsets = self._plan(layout)
            dst, _ = self._views(slot, ranks)
            item = dst[0].element_size()
            arrays = (
                torch.tensor([t.data_ptr() for t in dst], dtype=torch.int64),
                torch.tensor([offsets[i] * item for i in order], dtype=torch.int64),
                torch.tensor([t.numel() * item for t in dst], dtype=torch.int64),
            )
            entry = self._copy_plans[key] = (arrays, (tuple(a.data_ptr() for a in arrays), len(dst)))
        return entry[1]

    def _plan(self, layout: tuple) -> tuple[tuple[int, ...], list[int], list[int], list[int]]:
        """For one adapter layout: each layer's rank, which piece of the buffer fills each destination view, and
        the pieces' sizes and offsets in buffer order. Made once per layout (adapters of one shape share it)."""
        if (plan := self._plans.get(layout)) is None:
            if len(self._plans) >= 64:
                self._plans.clear()
            pieces = sorted(
                (off, n, m, ab) for m, r, i, o, a, b in layout for off, n, ab in ((a, r * i, 0), (b, r * o, 1))
            )
            index = {(m, ab): k for k, (_, _, m, ab) in enumerate(pieces)}
            rank = {m: r for m, r, *_ in layout}
            order = [index[name, ab] for name in self.layers if name in rank for ab in (0, 1)]
            plan = self._plans[layout] = (
                tuple(rank.get(name, 0) for name in self.layers),
                order,
                [n for _, n, _, _ in pieces],
                [off for off, _, _, _ in pieces],
            )
        return plan

    def _views(self, slot: int, ranks: tuple[int, ...]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Destination and padding views for one slot and rank layout, made once (views cost ≈2 µs each)."""
        key = (slot, ranks)
        if key not in self._view_cache:
            if len(self._view_cache) >= 4 * self.num_slots:
                self._view_cache.clear()
            dst, zero = [], []
            for layer, r in zip(self.layers.values(), ranks, strict=True):
                fill, pad = layer.slot_views(slot, r)
                dst += [t.view(-1) for t in fill]  # flat, as the buffer's pieces are
                zero += pad
            self._view_cache[key] = (dst, zero)
        return self._view_cache[key]

    def clear(self, slot: int) -> None:
        zero = [t for layer in self.layers.values() for t in layer.slot_views(slot, 0)[1]]
        torch._foreach_zero_(zero)
        self.slot_rank[slot] = 0
        self.slot_layers[slot] = frozenset()

    @property
    def nbytes_per_slot(self) -> int:
        return sum(layer.lora_a[0].nbytes + layer.lora_b[0].nbytes for layer in self.layers.values())


def targetable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear inside the decoder layers, named as PEFT names them (relative to the CausalLM)."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and ".layers." in f".{name}"
    }
