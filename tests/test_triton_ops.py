"""mux/triton_ops.py off CUDA: the kernels do not serve, and the reference they are checked against on a GPU
(`bench/gpu_check.py`, the first-use self-check) equals the engine's own SDPA decode path.

The kernels themselves run here too, in Triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET without CUDA; with CUDA they compile and run on the GPU), each of their tuning configs in turn:
the timing that picks one needs a GPU, and whichever it picks must be right.
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch

from mux import triton_ops
from mux.engine.kv_cache import AttentionMetadata, KVCache, decode_mask, mux_attention
from mux.lora.ops import stacked_pool


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


needs_triton = pytest.mark.skipif(triton_ops.triton is None, reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def lora_reference(x, a, b, slots, rank):
    live = (slots >= 0).to(x.dtype)[:, None]
    i = slots.clamp(min=0)
    return torch.einsum("ti,tri,tro->to", x, a[i, :rank], b[i, :rank]) * live  # [T, out]


@needs_triton
@pytest.mark.parametrize("rank", [1, 4, 8, 16])
def test_lora_add_every_config_equals_the_reference(rank):
    """Each shrink config with the first expand config and each expand config with the first shrink config;
    rows with no adapter (-1) untouched; y a column slice of a wider output, as a packed projection hands over."""
    g = torch.Generator().manual_seed(rank)
    rows, in_features, out_features, slots_n = 7, 80, 48, 3
    x = torch.randn(rows, in_features, generator=g)
    a = torch.randn(slots_n, 16, in_features, generator=g)  # [S, R, in]: rank padded to 16
    b = torch.randn(slots_n, 16, out_features, generator=g)
    slots = torch.tensor([2, -1, 0, 0, 1, 2, -1])
    base = torch.randn(rows, out_features + 20, generator=g)
    want = base.clone()
    want[:, 5 : 5 + out_features] += lora_reference(x, a, b, slots, rank)
    shrink, expand = triton_ops._lora_shrink, triton_ops._lora_expand
    pairs = [(c, expand.configs[0]) for c in shrink.configs] + [(shrink.configs[0], c) for c in expand.configs[1:]]
    for cs, ce in pairs:
        y = base.clone().to(DEVICE)
        with triton_ops.pinned({shrink: cs, expand: ce}):
            triton_ops.lora_add(
                y[:, 5 : 5 + out_features], *(t.to(DEVICE) for t in (x, *stacked_pool(a, b, 0), slots)), rank
            )  # fmt: skip
        assert torch.allclose(y.cpu(), want, atol=1e-4), (cs, ce)


@needs_triton
@pytest.mark.parametrize("rank", [1, 4, 8, 16])
def test_the_one_kernel_lora_add_equals_the_reference_in_every_config(rank):
    """`_lora_fused` (one kernel: h in registers, outputs shared out over N_SPLIT programs a row), each config; rows
    with no adapter untouched; y a column slice of a wider output; more output features than one program's share
    and fewer than the splits (7 outputs over up to 32 programs a row)."""
    g = torch.Generator().manual_seed(rank)
    for rows, in_features, out_features in ((7, 80, 48), (3, 600, 700), (5, 16, 7)):
        x = torch.randn(rows, in_features, generator=g)
        a = torch.randn(3, 16, in_features, generator=g)  # [S, R, in]: rank padded to 16
        b = torch.randn(3, 16, out_features, generator=g)
        slots = torch.tensor([2, -1, 0, 0, 1, 2, -1][:rows])
        base = torch.randn(rows, out_features + 20, generator=g)
        want = base.clone()
        want[:, 5 : 5 + out_features] += lora_reference(x, a, b, slots, rank)
        kernel = triton_ops._lora_fused
        for config in kernel.configs:
            y = base.clone().to(DEVICE)
            with triton_ops.pinned({kernel: config}):
                triton_ops.lora_add(
                    y[:, 5 : 5 + out_features], *(t.to(DEVICE) for t in (x, *stacked_pool(a, b, 1), slots)), rank,
                    fused=True,
                )  # fmt: skip
            assert torch.allclose(y.cpu(), want, atol=1e-3), (rows, in_features, out_features, config)


@needs_triton
def test_off_cuda_an_unpinned_lora_add_takes_the_two_kernels_untimed():
    """The choice between one kernel and two is timed on a GPU only; the interpreter (these tests) takes two."""
    x, a, b = torch.randn(2, 16), torch.randn(1, 8, 16), torch.randn(1, 8, 8)
    y = torch.zeros(2, 8)
    with triton_ops.pinned({k: k.configs[0] for k in (triton_ops._lora_shrink, triton_ops._lora_expand)}):
        triton_ops.lora_add(y, x, *stacked_pool(a, b), torch.tensor([0, 0]), 8)
    assert torch.allclose(y, lora_reference(x, a, b, torch.tensor([0, 0]), 8), atol=1e-4)
    assert not triton_ops.FUSED_TIMES


def paged_case(heads: int, kv_heads: int, dtype: torch.dtype, seed: int = 0):
    """Decode queries over scattered blocks of a cache, lengths from one position to several blocks, the query
    a transposed view as the model's attention hands it over: (q, k, v, tables, lens)."""
    g = torch.Generator().manual_seed(seed)
    bs, dim, lens = 16, 32, [1, 16, 17, 40, 64]
    k = torch.randn(24 * bs, kv_heads, dim, generator=g).to(dtype)  # [rows, Hkv, D]
    v = torch.randn(24 * bs, kv_heads, dim, generator=g).to(dtype)
    tables = torch.randperm(24, generator=g)[:20].view(5, 4)  # [B, nb]
    q = torch.randn(heads, len(lens), dim, generator=g).to(dtype).transpose(0, 1)  # [B, H, D], strides (D, B*D, 1)
    return q, k, v, tables, lens


@needs_triton
@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (9, 3), (8, 2)])  # no GQA, SmolLM2's 3 per KV head, 4
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_paged_decode_every_config_equals_the_reference(heads, kv_heads, dtype):
    q, k, v, tables, lens = paged_case(heads, kv_heads, dtype)
    want = triton_ops.paged_decode_reference(q.float(), k.float(), v.float(), tables, lens, 16)
    kernel = triton_ops._paged_decode
    for config in kernel.configs:
        out = torch.full(q.shape, float("nan"), dtype=dtype, device=DEVICE)
        with triton_ops.pinned({kernel: config}):
            triton_ops.paged_decode(
                *(t.to(DEVICE) for t in (q, k, v, tables, torch.tensor(lens))), 16, q.shape[-1] ** -0.5, out
            )  # fmt: skip
        tol = 1e-5 if dtype == torch.float32 else 2e-3
        assert torch.allclose(out.float().cpu(), want, atol=tol), config


@needs_triton
def test_self_check_passes_on_every_config():
    """The first-use check the engine runs before it serves with the kernels, on this device."""
    kernels = (triton_ops._lora_shrink, triton_ops._lora_expand, triton_ops._lora_fused, triton_ops._paged_decode)
    for configs in itertools.product(*(k.configs[:2] for k in kernels)):
        with triton_ops.pinned(dict(zip(kernels, configs, strict=True))):
            assert triton_ops._self_check(torch.device(DEVICE)) < 1e-4


@needs_triton
def test_the_first_use_check_tunes_nothing_and_restores_the_configs():
    kernels = (triton_ops._lora_shrink, triton_ops._lora_expand, triton_ops._lora_fused, triton_ops._paged_decode)
    before = [(k.configs, k.cache) for k in kernels]
    with triton_ops._untuned():
        assert all(len(k.configs) == 1 for k in kernels)
        assert triton_ops._self_check(torch.device(DEVICE)) < 1e-4
    assert [(k.configs, k.cache) for k in kernels] == before


@needs_triton
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(9, 3, 64), (4, 4, 128), (5, 1, 24)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rope_equals_transformers(heads, kv_heads, head_dim, dtype):
    """RoPE in place in one kernel equals transformers' apply_rotary_pos_emb (SmolLM2's heads, a 7B's head size,
    heads and half-dims off the powers of two), through the attention forward's `rope_` as the engine calls it:
    q [B, T, H*D] and k [B, T, Hkv*D] fresh projection outputs, cos/sin [1, T, D] broadcast over the batch."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from mux.model import cpu_layers

    g = torch.Generator().manual_seed(head_dim)
    batch, tokens = 2, 5
    q = torch.randn(batch, tokens, heads * head_dim, generator=g).to(dtype)
    k = torch.randn(batch, tokens, kv_heads * head_dim, generator=g).to(dtype)
    angles = torch.randn(1, tokens, head_dim // 2, generator=g).repeat(1, 1, 2)  # [1, T, D], halves equal as HF's
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    split = lambda t, h: t.view(batch, tokens, h, head_dim).transpose(1, 2)  # noqa: E731  [B, H, T, D]
    want_q, want_k = apply_rotary_pos_emb(split(q, heads), split(k, kv_heads), cos, sin)
    rows_cos, rows_sin = (t.expand(batch, -1, -1).contiguous() for t in (cos, sin))  # [B, T, D]: a row per token
    got_q, got_k = triton_ops.rope_(*(t.to(DEVICE) for t in (q.clone(), k.clone(), rows_cos, rows_sin)), head_dim)
    tol = 1e-6 if dtype == torch.float32 else 2e-3  # half: rounded once here, after each op in transformers
    assert torch.allclose(split(got_q.cpu(), heads).float(), want_q.float(), atol=tol)
    assert torch.allclose(split(got_k.cpu(), kv_heads).float(), want_k.float(), atol=tol)
    if DEVICE == "cpu" and dtype == torch.float32:  # the C kernel's contract, which the CUDA path shares
        c_q, c_k = cpu_layers.rope_(q.clone(), k.clone(), cos, sin, head_dim)
        assert torch.allclose(c_q, got_q, atol=1e-6) and torch.allclose(c_k, got_k, atol=1e-6)
