"""mux/triton_ops.py off CUDA: the kernels do not serve, and the reference they are checked against on a GPU
(`bench/gpu_check.py`, the first-use self-check) equals the engine's own SDPA decode path."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from mux import triton_ops
from mux.engine.kv_cache import AttentionMetadata, KVCache, decode_mask, mux_attention


def test_not_served_off_cuda():
    assert not triton_ops.serves("cpu")


def test_paged_decode_reference_equals_the_sdpa_decode_path():
    g = torch.Generator().manual_seed(0)
    bs, heads, kv_heads, dim, lens = 4, 6, 2, 8, [1, 4, 5, 11]
    cache = KVCache(1, 16, bs, kv_heads, dim, torch.float32, "cpu", use_native=False)
    cache.k.normal_(generator=g)
    cache.v.normal_(generator=g)
    tables = torch.randperm(16, generator=g)[:12].view(4, 3)  # [B, nb] scattered blocks
    lens_t = torch.tensor(lens)
    rows = tables[torch.arange(4), (lens_t - 1) // bs] * bs + (lens_t - 1) % bs  # each new token's cache row
    q = torch.randn(4, heads, dim, generator=g)
    k_new, v_new = torch.randn(4, kv_heads, dim, generator=g), torch.randn(4, kv_heads, dim, generator=g)
    meta = AttentionMetadata(cache, rows, 4, tables, decode_mask(lens_t, 3 * bs), (), lens_t)
    got = mux_attention(
        SimpleNamespace(layer_idx=0), q.transpose(0, 1)[None], k_new.transpose(0, 1)[None],
        v_new.transpose(0, 1)[None], None, mux_attn=meta,
    )[0][0]  # fmt: skip
    want = triton_ops.paged_decode_reference(q, cache.k[0], cache.v[0], tables, lens, bs)  # after the write
    assert torch.allclose(got, want, atol=1e-6)
