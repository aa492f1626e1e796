"""Paged KV storage and the attention function plugged into transformers' attention interface.

The cache is carved once out of a fixed byte budget into blocks of `block_size` tokens; a sequence
owns only the blocks its tokens fill, so nothing is padded to the longest sequence. Each step the
runner publishes an `AttentionMetadata`; the model's attention modules call `mux_attention`, which
writes the step's new K/V into the cache and attends over each sequence's own blocks. Decode rows go to a kernel
that reads each sequence's blocks in place: in C on CPU float32 (`mux/csrc/attention.c`), in Triton on CUDA
(`mux/triton_ops.py`); elsewhere the blocks are gathered and attended with SDPA. Prefills of equal length with no
cached prefix share one SDPA call. One block past the budget is scratch: padded rows of a captured decode graph
(`mux/engine/graphs.py`) write and read it, and no sequence is ever given it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from mux import native, triton_ops
from mux.config import CacheConfig

ATTN_IMPLEMENTATION = "mux"


class KVCache:
    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        use_native: bool = False,
    ) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.scratch_block = num_blocks  # the extra block, never handed out
        shape = (num_layers, (num_blocks + 1) * block_size, num_kv_heads, head_dim)
        # zeros, not empty: padded positions are masked, but 0·NaN from stale garbage would still be NaN
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # [L, blocks*bs, Hkv, D]
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.native = use_native and native.serves(device, dtype)  # decode attention in C
        pow2 = all(n & (n - 1) == 0 for n in (block_size, head_dim))  # Triton's block shapes are powers of two
        self.paged = not self.native and pow2 and triton_ops.serves(device)  # decode attention in Triton

    @classmethod
    def for_model(cls, hf_config, config: CacheConfig, dtype: torch.dtype, device, native: bool = True) -> KVCache:
        """native: decode attention in C where it serves (else SDPA, or Triton on CUDA)."""
        layers = hf_config.num_hidden_layers
        kv_heads = getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
        per_block = 2 * layers * config.block_size * kv_heads * head_dim * torch.finfo(dtype).bits // 8
        num_blocks = config.kv_cache_bytes // per_block
        if num_blocks < 1:
            raise ValueError(f"kv_cache_bytes={config.kv_cache_bytes} holds no block of {per_block} bytes")
        return cls(layers, num_blocks, config.block_size, kv_heads, head_dim, dtype, device, native)


@dataclass(frozen=True, slots=True)
class PrefillSpan:
    start: int  # first row of this sequence's tokens in the flat batch
    num_tokens: int  # query length
    context_len: int  # tokens attended to (cached prefix + these)
    block_table: torch.Tensor | None  # [nb] blocks to read; None when there is no cached prefix


@dataclass(frozen=True, slots=True)
class PrefillGroup:
    """Prefills of one length with no cached prefix, attended in one SDPA call."""

    rows: torch.Tensor  # [count * num_tokens] int64 their rows in the flat batch, sequence by sequence
    count: int
    num_tokens: int


@dataclass(frozen=True, slots=True)
class AttentionMetadata:
    """One step's attention layout. Rows [0, num_decode) are single-token sequences; prefill spans follow."""

    cache: KVCache
    slot_mapping: torch.Tensor  # [T] cache row of each new token
    num_decode: int
    decode_tables: torch.Tensor | None  # [B, nb] block tables, padded with block 0
    decode_mask: torch.Tensor | None  # [B, 1, 1, nb*bs] True where a position belongs to the sequence
    prefills: tuple[PrefillSpan, ...]
    decode_lens: torch.Tensor | None  # [B] int64 cached positions of each decode (its new token included)
    prefill_groups: tuple[PrefillGroup, ...] = ()


def decode_mask(lens: torch.Tensor, positions: int) -> torch.Tensor:
    """[B, 1, 1, positions] True where a position belongs to the sequence (lens [B]): SDPA's mask over the
    gathered blocks."""
    return (torch.arange(positions, device=lens.device)[None, :] < lens[:, None])[:, None, None, :]


def mux_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, mux_attn=None, **kwargs):
    """query [1, H, T, D], key/value [1, Hkv, T, D] -> ([1, T, H, D], None)."""
    meta: AttentionMetadata = mux_attn
    cache = meta.cache
    layer = module.layer_idx
    k_cache, v_cache = cache.k[layer], cache.v[layer]  # [rows, Hkv, D]
    k_new = key[0].transpose(0, 1)  # [T, Hkv, D]
    v_new = value[0].transpose(0, 1)
    k_cache.index_copy_(0, meta.slot_mapping, k_new)
    v_cache.index_copy_(0, meta.slot_mapping, v_new)
    q = query[0].transpose(0, 1)  # [T, H, D]
    out = q.new_empty(q.shape)  # [T, H, D]
    bs = cache.block_size

    scale = q.shape[-1] ** -0.5 if scaling is None else scaling
    if meta.num_decode and cache.native:
        _native_decode(q, k_cache, v_cache, meta, scale, out)
    elif meta.num_decode and cache.paged:
        qd = q[: meta.num_decode] if q.stride(2) == 1 else q[: meta.num_decode].contiguous()
        triton_ops.paged_decode(qd, k_cache, v_cache, meta.decode_tables, meta.decode_lens, bs, scale, out)
    elif meta.num_decode:
        # The query heads sharing a KV head become that head's query rows (GQA without expanding K/V), and the
        # blocks are gathered with index_select: 1.5× faster than enable_gqa over advanced indexing for 64
        # SmolLM2 sequences, side by side in `python -m bench.attention`.
        b, kv_heads, head_dim = meta.num_decode, k_cache.shape[1], k_cache.shape[2]
        tables = meta.decode_tables.flatten()  # [B*nb]
        shape = (b, -1, kv_heads, head_dim)
        kd = k_cache.view(-1, bs, kv_heads, head_dim).index_select(0, tables).view(shape).transpose(1, 2)
        vd = v_cache.view(-1, bs, kv_heads, head_dim).index_select(0, tables).view(shape).transpose(1, 2)
        qd = q[:b].view(b, kv_heads, -1, head_dim)  # [B, Hkv, H/Hkv, D]: query head h reads KV head h // (H/Hkv)
        o = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=meta.decode_mask, scale=scaling)  # [B, Hkv, G, D]
        out[:b] = o.reshape(b, -1, head_dim)

    for group in meta.prefill_groups:
        shape = (group.count, group.num_tokens, -1, q.shape[-1])
        qp, kp, vp = (t.index_select(0, group.rows).view(shape).transpose(1, 2) for t in (q, k_new, v_new))
        o = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=scaling, enable_gqa=True)  # [c,H,n,D]
        out.index_copy_(0, group.rows, o.transpose(1, 2).reshape(-1, *q.shape[1:]))
    for span in meta.prefills:
        rows = slice(span.start, span.start + span.num_tokens)
        qp = q[rows].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
        if span.block_table is None:
            kp = k_new[rows].transpose(0, 1).unsqueeze(0)  # [1, Hkv, n, D]
            vp = v_new[rows].transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=scaling, enable_gqa=True)
        else:
            ctx = span.context_len
            kp = k_cache.view(-1, bs, *k_cache.shape[1:]).index_select(0, span.block_table).flatten(0, 1)[:ctx]
            vp = v_cache.view(-1, bs, *v_cache.shape[1:]).index_select(0, span.block_table).flatten(0, 1)[:ctx]
            q_pos = torch.arange(ctx - span.num_tokens, ctx, device=q.device)
            mask = torch.arange(ctx, device=q.device)[None, :] <= q_pos[:, None]  # [n, ctx]
            o = F.scaled_dot_product_attention(
                qp,
                kp.transpose(0, 1).unsqueeze(0),
                vp.transpose(0, 1).unsqueeze(0),
                attn_mask=mask,
                scale=scaling,
                enable_gqa=True,
            )
        out[rows] = o[0].transpose(0, 1)
    return out.unsqueeze(0), None


def _native_decode(q, k_cache, v_cache, meta: AttentionMetadata, scale: float, out: torch.Tensor) -> None:
    """q [T, H, D]: rows [0, B) are the decodes; writes out[:B] ([T, H, D] contiguous) with the C kernel."""
    if q.stride(2) != 1:
        q = q.contiguous()
    tables, lens = meta.decode_tables.contiguous(), meta.decode_lens.contiguous()  # [B, nb], [B] int64
    failed = native.library().mux_decode_attention(
        q.data_ptr(), q.stride(0), q.stride(1), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(),
        tables.shape[1], lens.data_ptr(), meta.cache.block_size, meta.num_decode, q.shape[1], k_cache.shape[1],
        q.shape[2], scale, out.data_ptr(),
    )  # fmt: skip
    if failed:
        raise MemoryError("decode attention: no memory for the scores")


AttentionInterface.register(ATTN_IMPLEMENTATION, mux_attention)
