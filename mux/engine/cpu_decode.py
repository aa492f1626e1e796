"""CPU decode steps without transformers' forward (the CPU's counterpart of mux/engine/graphs.py).

At a few rows a decode step is a stream over the weights (SmolLM2: ≈14 ms here), and transformers' forward around
the C kernels added 5-9 ms more of Python: ≈11 nn.Module calls a layer, its model forward's mask and output
plumbing, each linear's checks and its pointers fetched anew. This makes the same calls in the same order, so the
result is bitwise that forward with mux/model/cpu_layers.py's layers (tested): each layer is its norms, linears
with their LoRA deltas, RoPE, K/V writes, attention, SiLU·up and residual add.

Every pure decode step is one loop of C calls over every weight's, slot stack's and work buffer's address, looked
up once per row count (the work buffers are one pool, grown to the largest step yet, so every row count shares
its addresses). Each linear is as MultiLoRALinear.forward makes it: at 1-8 rows with their LoRA rows in the fused
layout, the linear and its deltas in one call (`mux_linear_lora`); else the linear, then the C LoRA kernel on the
step's rows (`mux_lora_add`), or `lora_add_` where torch's layouts serve some rows (long runs above rank 16, or
`LoRAConfig.native_kernel=False`).

Serves Llama-family models whose layers have the C forwards (`fuse_layers`) and whose linears all run on the C
kernel (`mux/model/cpu.py`), on pure decode steps with the C attention; steps with a prefill run through
transformers' forward.
`python -m bench.small_linear` measures both side by side.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from mux import native
from mux.engine.kv_cache import AttentionMetadata, KVCache
from mux.lora.layers import MultiLoRALinear
from mux.lora.ops import LoRABatch, lora_add_
from mux.model import cpu_layers
from mux.model.cpu import FEW_ROWS, PackedLinear

_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True, slots=True)
class _Linear:
    base: PackedLinear
    lora: MultiLoRALinear | None  # None: not wrapped (no adapter can target it)


@dataclass(frozen=True, slots=True)
class _Buffers:
    """One row count's work tensors; their addresses go into the precomputed calls."""

    h: torch.Tensor  # [T, hidden] the residual stream (a layer's input, then its output)
    x: torch.Tensor  # [T, hidden] a norm's output
    q: torch.Tensor  # [T, H*D]
    k: torch.Tensor  # [T, Hkv*D]
    v: torch.Tensor  # [T, Hkv*D]
    a: torch.Tensor  # [T, H*D] attention output
    o: torch.Tensor  # [T, hidden] o_proj's output, then the residual sum
    g: torch.Tensor  # [T, inter] gate, then SiLU(gate)·up
    u: torch.Tensor  # [T, inter]


class CPUDecode:
    def __init__(self, model: nn.Module, cache: KVCache) -> None:
        """Use `for_model`, which checks that the model qualifies."""
        body = model.model
        self.embed = body.embed_tokens.weight  # [V, hidden]
        self.rotary = body.rotary_emb
        self.final_norm = body.norm
        self.layers = list(body.layers[: model.config.num_hidden_layers])
        self.cache = cache
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.scale = attn.scaling
        self.heads = attn.q_proj.out_features // self.head_dim
        self.kv_heads = attn.k_proj.out_features // self.head_dim
        self.linears = [[_linear(_projection(layer, name)) for name in _PROJECTIONS] for layer in self.layers]
        self._pool = self._buffers(1)  # the work tensors, grown to the largest step yet
        self._calls: dict[int, tuple[_Buffers, list[tuple]]] = {}  # rows -> (the pool's rows, per-layer args)

    @classmethod
    def for_model(cls, model: nn.Module, cache: KVCache) -> CPUDecode | None:
        """A CPUDecode when the model and cache qualify (see the module's docstring), else None."""
        body = getattr(model, "model", None)
        layers = getattr(body, "layers", None)
        if not (cache.native and layers and getattr(model.config, "hidden_act", None) == "silu"):
            return None
        if not all(hasattr(body, n) for n in ("embed_tokens", "rotary_emb", "norm")):
            return None
        for layer in layers[: model.config.num_hidden_layers]:
            if not cpu_layers.is_fused(layer):
                return None
            for name in _PROJECTIONS:
                if not isinstance(_linear(_projection(layer, name)).base, PackedLinear):
                    return None
        return cls(model, cache)

    @staticmethod
    def takes(rows: int, meta: AttentionMetadata) -> bool:
        """Whether this step is this path's: `rows` decodes, no prefill."""
        return meta.num_decode == rows > 0 and not meta.prefills and not meta.prefill_groups

    def run(self, ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, batch: LoRABatch | None):
        """ids, positions [T] int64 -> the final norm's hidden states [T, hidden] (transformers' last_hidden_state)."""
        rows = ids.shape[0]
        lib = native.library()
        lora_add = lib.mux_lora_add
        buf, calls = self._prepared(rows)
        torch.index_select(self.embed, 0, ids, out=buf.h)
        cos, sin = (t.contiguous() for t in self.rotary(buf.h, positions[None]))  # [1, T, D] each
        rope_tail = (cos.data_ptr(), sin.data_ptr(), self.head_dim, rows, self.head_dim)
        tables, lens = meta.decode_tables.contiguous(), meta.decode_lens.contiguous()  # [T, nb], [T] int64
        attn_mid = (tables.data_ptr(), tables.shape[1], lens.data_ptr())
        fused = batch.few.pointers if batch is not None and batch.few is not None else None  # rows' slots, ranks
        items = (*batch.native.pointers, batch.native.items) if _native_only(batch) else None
        slots = meta.slot_mapping
        k_rows, v_rows = buf.k.view(rows, self.kv_heads, -1), buf.v.view(rows, self.kv_heads, -1)  # [T, Hkv, D]

        def project(call: _Call) -> None:
            """As MultiLoRALinear.forward: the fused call, else the linear and then the step's LoRA rows."""
            if call.lora is None or batch is None or not batch.targets(call.index):
                call.linear(*call.args)
                return
            if fused is not None and call.fused is not None:
                call.fused(*call.args, *call.lora, *fused)
                return
            call.linear(*call.args)
            if items is not None:
                lora_add(*call.lora_add, *items)
            else:  # torch's layouts serve some rows (long runs above rank 16, or without the C LoRA kernel)
                lora_add_(*call.tensors, batch)

        for norm1, projections, rope_head, attn_head, attn_tail, norm2, k_cache, v_cache in calls:
            q, k, v, o, gate, up, down = projections
            lib.mux_rms_norm(*norm1)
            for projection in (q, k, v):
                project(projection)
            lib.mux_rope(*rope_head, *rope_tail)
            k_cache.index_copy_(0, slots, k_rows)
            v_cache.index_copy_(0, slots, v_rows)
            if lib.mux_decode_attention(*attn_head, *attn_mid, *attn_tail):
                raise MemoryError("decode attention: no memory for the scores")
            project(o)
            lib.mux_rms_norm(*norm2)  # the residual sum into o, the second norm into x
            project(gate)
            project(up)
            F.silu(buf.g, inplace=True).mul_(buf.u)  # as transformers' act_fn(gate) * up
            project(down)  # into h
            buf.h.add_(buf.o)  # down's output + the residual
        return cpu_layers.rms_norm(self.final_norm, buf.h)  # a fresh tensor: buf.h is the next step's

    def _prepared(self, rows: int) -> tuple[_Buffers, list[tuple]]:
        if (entry := self._calls.get(rows)) is None:
            if rows > self._pool.h.shape[0]:  # new addresses: every row count's calls are made again
                self._pool = self._buffers(max(rows, 2 * self._pool.h.shape[0]))
                self._calls.clear()
            entry = self._calls[rows] = self._prepare(rows)
        return entry

    def _buffers(self, rows: int) -> _Buffers:
        hidden, d = self.embed.shape[1], self.head_dim
        inter = self.linears[0][4].base.out_features
        widths = (hidden, hidden, self.heads * d, self.kv_heads * d, self.kv_heads * d, self.heads * d, hidden, inter,
                  inter)  # fmt: skip
        return _Buffers(*(self.embed.new_empty(rows, n) for n in widths))

    def _prepare(self, rows: int) -> tuple[_Buffers, list[tuple]]:
        """The pool's first rows (the same addresses for every row count) and the calls over them."""
        hidden, d = self.embed.shape[1], self.head_dim
        buf = _Buffers(*(getattr(self._pool, f.name)[:rows] for f in fields(_Buffers)))
        flow = [(buf.x, buf.q), (buf.x, buf.k), (buf.x, buf.v), (buf.a, buf.o), (buf.x, buf.g), (buf.x, buf.u),
                (buf.g, buf.h)]  # fmt: skip
        calls = []
        for layer, linears, k_cache, v_cache in zip(self.layers, self.linears, self.cache.k, self.cache.v, strict=True):
            w1, w2 = layer.input_layernorm, layer.post_attention_layernorm
            norm1 = (buf.h.data_ptr(), hidden, None, hidden, w1.weight.data_ptr(), buf.x.data_ptr(), hidden, rows,
                     hidden, w1.variance_epsilon)  # fmt: skip
            norm2 = (buf.o.data_ptr(), hidden, buf.h.data_ptr(), hidden, w2.weight.data_ptr(), buf.x.data_ptr(),
                     hidden, rows, hidden, w2.variance_epsilon)  # fmt: skip
            projections = tuple(_linear_args(lin, x, y, rows) for lin, (x, y) in zip(linears, flow, strict=True))
            q, k = buf.q, buf.k
            rope_head = (q.data_ptr(), q.shape[1], self.heads, k.data_ptr(), k.shape[1], self.kv_heads)
            attn_head = (q.data_ptr(), q.shape[1], d, k_cache.data_ptr(), v_cache.data_ptr())
            attn_tail = (self.cache.block_size, rows, self.heads, self.kv_heads, d, self.scale, buf.a.data_ptr())
            calls.append((norm1, projections, rope_head, attn_head, attn_tail, norm2, k_cache, v_cache))
        return buf, calls


def _native_only(batch: LoRABatch | None) -> bool:
    """All of the step's LoRA rows in the C kernel's layout (none in torch's: long runs above its rank)."""
    return (
        batch is not None
        and batch.native is not None
        and not batch.segments
        and batch.gather is None
        and batch.token_slots is None
    )


def _projection(layer: nn.Module, name: str) -> nn.Module:
    return getattr(layer.mlp if name in ("gate_proj", "up_proj", "down_proj") else layer.self_attn, name)


def _linear(module: nn.Module) -> _Linear:
    if isinstance(module, MultiLoRALinear):
        return _Linear(module.base, module)
    return _Linear(module, None)


@dataclass(frozen=True, slots=True)
class _Call:
    """One linear of a row count's step, its calls precomputed."""

    linear: object  # the C kernel (args: its arguments), or PackedLinear.into (args: x, y, rows) where oneDNN serves
    args: tuple
    fused: object | None  # the C linear + LoRA call taking args + lora + the rows' slots and ranks (None: none)
    lora: tuple | None  # the pools' and page table's addresses, the table's width (None: not wrapped)
    lora_add: tuple  # mux_lora_add's arguments before the work items
    index: int  # the wrapped linear's index (-1: not wrapped)
    tensors: tuple  # lora_add_'s tensors (y, x, a, b, table)


def _linear_args(lin: _Linear, x: torch.Tensor, y: torch.Tensor, rows: int) -> _Call:
    """The calls of x [T, in] -> y [T, out] at this row count, with the pick that serves it."""
    base = lin.base
    k, n = base.in_features, base.out_features
    bias = None if base.bias is None else base.bias.data_ptr()
    c, fused = base.c_kernel(rows), base.c_kernel(rows, fused=True)
    if c is None:  # oneDNN serves this row count: its result is copied into y
        linear, args = base.into, (x, y, rows)
    else:
        linear, args = c[0], (x.data_ptr(), k, y.data_ptr(), n, c[1], bias, rows, k, n)
    if lin.lora is None:
        return _Call(linear, args, None, None, (), -1, ())
    a, b, table = lin.lora.lora_a, lin.lora.lora_b, lin.lora.ctx.table  # pools [P, in], [P, out]; table [S, R]
    lora = (a.data_ptr(), b.data_ptr(), table.data_ptr(), table.shape[1])
    lora_add = (x.data_ptr(), k, y.data_ptr(), n, *lora, k, n)
    fused_fn = fused[0] if fused and rows <= FEW_ROWS else None
    return _Call(linear, args, fused_fn, lora, lora_add, lin.lora.index, (y, x, a, b, table))
