"""The CUDA kernels, in Triton: the per-token multi-LoRA add (punica's BGMV) and paged decode attention.

On a GPU, torch's own ops need the slot weights or the KV blocks gathered (copied) into dense tensors before a
batched matmul or SDPA can read them. These kernels read each token's slot weights, and each sequence's KV
blocks, in place. Measured on an H200 (`bench/gpu_profile.py`, 256 rows, 4096 features, rank 8, inside a CUDA
graph): the LoRA add 0.018 ms vs 0.066 for torch's gather (5 slots), 0.020 vs 0.075 (256 slots); the attention
kernel's SDPA baseline is timed beside it from 2026-12-04 on, not yet on a GPU. The LoRA add also has a
one-kernel form (no zeroed buffer, no atomics), chosen per shape by timing at first use (not yet on a GPU
either). They serve
on CUDA when triton imports (it ships with torch's CUDA wheels) and they pass a self-check at first use;
elsewhere, or with `MUX_TRITON=0`, torch's ops serve (`mux/lora/ops.py`, `mux/engine/kv_cache.py`).
`bench/gpu_check.py` checks both against the CPU reference on the device; the tests run them without a GPU, in
Triton's interpreter on CPU tensors, every tuning config (tests/test_triton_ops.py).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os

import torch

log = logging.getLogger(__name__)

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU wheels of torch ship no triton
    triton = None


def serves(device: torch.device | str) -> bool:
    """Whether the Triton kernels take tensors on `device`: CUDA, triton importable, not turned off, and both
    kernels equal to torch on a small case the first time this is asked (else torch's ops serve, logged once)."""
    device = torch.device(device)
    return device.type == "cuda" and _works(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _works(index: int) -> bool:
    if triton is None:
        log.info("triton kernels off: triton is not installed")
        return False
    if os.environ.get("MUX_TRITON", "1") == "0":
        return False
    try:
        with _untuned():
            error = _self_check(torch.device("cuda", index))
    except Exception:  # a failed compile or launch: torch's ops still serve
        log.exception("triton kernels off: they failed to run")
        return False
    if error > 1e-3:
        log.warning("triton kernels off: they differ from torch by %.2e", error)
        return False
    return True


@contextlib.contextmanager
def pinned(choice: dict):
    """Run each autotuned kernel in `choice` ({kernel: config}) with that config alone (no timing), its configs
    and tuning cache back after."""
    saved = [(k, k.configs, k.cache) for k in choice]
    for k, config in choice.items():
        k.configs, k.cache = [config], {}
    try:
        yield
    finally:
        for k, configs, cache in saved:
            k.configs, k.cache = configs, cache


def _untuned():
    """Each kernel with its first config: the self-check's tiny shapes are never served, so timing every config
    for them would only cost compiles at first use. (Every config is checked against torch in the tests.)"""
    return pinned({k: k.configs[0] for k in (_lora_shrink, _lora_expand, _lora_fused, _paged_decode)})


def _self_check(device: torch.device) -> float:
    """Largest |difference| of both kernels from torch on a small float32 case."""
    g = torch.Generator().manual_seed(0)
    x, a, b = torch.randn(6, 80, generator=g), torch.randn(3, 4, 80, generator=g), torch.randn(3, 4, 48, generator=g)
    slots = torch.tensor([2, -1, 0, 0, 1, 2])
    live = (slots >= 0).float()[:, None]
    want = torch.einsum("ti,tri,tro->to", x, a[slots.clamp(min=0)], b[slots.clamp(min=0)]) * live  # [6, 48]
    error = 0.0
    table = torch.arange(12, device=device).view(3, 4)  # slot s's rank k at pool row 4s + k
    for fused in (False, True):
        y = torch.zeros(6, 48, device=device)
        pools = a.to(device).view(12, 80), b.to(device).view(12, 48)
        lora_add(y, x.to(device), *pools, table, slots.to(device), 4, fused)
        error = max(error, (y.cpu() - want).abs().max().item())
    q, k, v = (
        torch.randn(2, 4, 16, generator=g),
        torch.randn(48, 2, 16, generator=g),
        torch.randn(48, 2, 16, generator=g),
    )
    tables, lens = torch.tensor([[2, 0, 1], [1, 0, 0]]), torch.tensor([40, 3])
    ref = paged_decode_reference(q, k, v, tables, lens.tolist(), 16)
    out = torch.empty(2, 4, 16, device=device)
    paged_decode(q.to(device), k.to(device), v.to(device), tables.to(device), lens.to(device), 16, 0.25, out)
    error = max(error, (out.cpu() - ref).abs().max().item())
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    q, k = torch.randn(3, 2 * 16, generator=g), torch.randn(3, 16, generator=g)  # [rows, H*D], [rows, Hkv*D]
    cos, sin = torch.randn(3, 16, generator=g), torch.randn(3, 16, generator=g)  # [rows, D]
    heads = lambda t: t.view(1, 3, -1, 16).transpose(1, 2)  # noqa: E731  [1, H, rows, D], as transformers takes it
    want = apply_rotary_pos_emb(heads(q), heads(k), cos[None], sin[None])
    got = rope_(*(t.to(device) for t in (q, k, cos, sin)), 16)
    return max(error, *((heads(t.cpu()) - w).abs().max().item() for t, w in zip(got, want, strict=True)))


def paged_decode_reference(q, k, v, tables, lens: list[int], block_size: int) -> torch.Tensor:
    """What `paged_decode` computes, one sequence at a time: SDPA over its gathered rows. q [B, H, D]; k/v
    [rows, Hkv, D]; tables [B, nb]. Returns [B, H, D]."""
    out = torch.empty_like(q)
    for i, n in enumerate(lens):
        rows = (tables[i][:, None] * block_size + torch.arange(block_size, device=tables.device)).flatten()[:n]
        kk, vv = (t[rows].transpose(0, 1)[None] for t in (k, v))  # [1, Hkv, n, D]
        out[i] = torch.nn.functional.scaled_dot_product_attention(q[i][None, :, None], kk, vv, enable_gqa=True)[0, :, 0]
    return out


if triton is not None:
    # Block shapes are picked by timing at first use per (features, rank, few or many rows), once: Triton's
    # default timing, 25 ms of warm-up and 100 ms of runs per config.
    # h starts at zero and y is restored around each timed run, so the first call's result is still exact.

    @triton.autotune(
        [triton.Config({"SPLIT_K": s, "BLOCK_K": k}, num_warps=w) for s, k, w in
         ((8, 256, 4), (4, 512, 4), (16, 128, 2), (2, 1024, 8), (1, 512, 4))],
        key=["in_features", "rank", "many"], reset_to_zero=["h"],
    )  # fmt: skip
    @triton.jit
    def _lora_shrink(x, x_row, a, a_row, table, t_row, slots, h, rank, in_features, many, R: tl.constexpr,
                     SPLIT_K: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
        """h[t, :rank] += x[t, ks] · A[slot[t], :rank, ks]ᵀ over this program's share ks of the input features
        (rank k of a slot is the pool's row table[slot, k], as in the C kernel)."""
        t, split = tl.program_id(0), tl.program_id(1)
        slot = tl.load(slots + t)
        # a row with no adapter (slot -1) reads and adds nothing: its bounds are zero. (Bounds, not `mask & valid`:
        # Triton's interpreter, which runs these kernels in the CPU tests, mistypes a block mask and a scalar.)
        limit = tl.where(slot >= 0, in_features, 0)
        ranks = tl.where(slot >= 0, rank, 0)  # (a new name: Triton may pass `rank` as a constant, 1)
        slot = tl.maximum(slot, 0)
        r = tl.arange(0, R)
        rows = tl.load(table + slot * t_row + r, mask=r < ranks, other=0)  # [R] pool rows of the slot's ranks
        acc = tl.zeros((R,), dtype=tl.float32)
        for k0 in range(split * BLOCK_K, limit, SPLIT_K * BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            xv = tl.load(x + t * x_row + k, mask=k < limit, other=0.0).to(tl.float32)
            mask = (r[:, None] < ranks) & (k[None, :] < limit)
            av = tl.load(a + rows[:, None] * a_row + k[None, :], mask=mask, other=0.0)
            acc += tl.sum(av.to(tl.float32) * xv[None, :], axis=1)
        tl.atomic_add(h + t * R + r, acc, mask=r < ranks)

    @triton.autotune(
        [triton.Config({"BLOCK_N": n}, num_warps=w) for n, w in ((128, 4), (256, 4), (512, 4), (512, 8), (1024, 8))],
        key=["out_features", "rank", "many"], restore_value=["y"],
    )  # fmt: skip
    @triton.jit
    def _lora_expand(h, b, b_row, table, t_row, slots, y, y_row, rank, out_features, many, R: tl.constexpr,
                     BLOCK_N: tl.constexpr):  # fmt: skip
        """y[t, ns] += h[t, :rank] · B[slot[t], :rank, ns] for this program's block ns of output features."""
        t, nb = tl.program_id(0), tl.program_id(1)
        slot = tl.load(slots + t)
        limit = tl.where(slot >= 0, out_features, 0)  # a row with no adapter: nothing read or written
        slot = tl.maximum(slot, 0)
        r = tl.arange(0, R)
        n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        hv = tl.load(h + t * R + r, mask=r < rank, other=0.0)
        rows = tl.load(table + slot * t_row + r, mask=r < rank, other=0)  # [R]
        mask = (r[:, None] < rank) & (n[None, :] < limit)
        bv = tl.load(b + rows[:, None] * b_row + n[None, :], mask=mask, other=0.0)
        delta = tl.sum(hv[:, None] * bv.to(tl.float32), axis=0)
        out = n < limit
        yv = tl.load(y + t * y_row + n, mask=out, other=0.0)
        tl.store(y + t * y_row + n, (yv.to(tl.float32) + delta).to(yv.dtype), mask=out)

    # One kernel for the whole add (no zeroed h, no atomics): each program computes its row's h = x A_slotᵀ in
    # registers, over all the input features, then adds h B_slot to its share of the output features. N_SPLIT
    # programs a row share the outputs, each recomputing h (A read again, from cache). Whether this beats the
    # two kernels above is timed at first use per shape (`lora_add`); not yet run on a GPU.
    @triton.autotune(
        [triton.Config({"N_SPLIT": s, "BLOCK_K": k, "BLOCK_N": n}, num_warps=w) for s, k, n, w in
         ((1, 512, 512, 4), (4, 256, 256, 4), (8, 256, 512, 4), (16, 512, 256, 4), (32, 256, 128, 2))],
        key=["in_features", "out_features", "rank", "many"], restore_value=["y"],
    )  # fmt: skip
    @triton.jit
    def _lora_fused(x, x_row, a, a_row, b, b_row, table, t_row, slots, y, y_row, rank, in_features,
                    out_features, many, R: tl.constexpr, N_SPLIT: tl.constexpr, BLOCK_K: tl.constexpr,
                    BLOCK_N: tl.constexpr):  # fmt: skip
        """y[t, ns] += (x[t] · A[slot[t], :rank]ᵀ) · B[slot[t], :rank, ns] for this program's share ns."""
        t, split = tl.program_id(0), tl.program_id(1)
        slot = tl.load(slots + t)
        k_limit = tl.where(slot >= 0, in_features, 0)  # a row with no adapter: nothing read or written
        n_limit = tl.where(slot >= 0, out_features, 0)
        ranks = tl.where(slot >= 0, rank, 0)
        slot = tl.maximum(slot, 0)
        r = tl.arange(0, R)
        rows = tl.load(table + slot * t_row + r, mask=r < ranks, other=0)  # [R] pool rows of the slot's ranks
        h = tl.zeros((R,), dtype=tl.float32)
        for k0 in range(0, k_limit, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            xv = tl.load(x + t * x_row + k, mask=k < k_limit, other=0.0).to(tl.float32)
            mask = (r[:, None] < ranks) & (k[None, :] < k_limit)
            av = tl.load(a + rows[:, None] * a_row + k[None, :], mask=mask, other=0.0)
            h += tl.sum(av.to(tl.float32) * xv[None, :], axis=1)
        share = tl.cdiv(tl.cdiv(out_features, N_SPLIT), BLOCK_N) * BLOCK_N
        end = tl.minimum(split * share + share, n_limit)
        for n0 in range(split * share, end, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            out = n < end
            mask = (r[:, None] < ranks) & out[None, :]
            bv = tl.load(b + rows[:, None] * b_row + n[None, :], mask=mask, other=0.0)
            delta = tl.sum(h[:, None] * bv.to(tl.float32), axis=0)
            yv = tl.load(y + t * y_row + n, mask=out, other=0.0)
            tl.store(y + t * y_row + n, (yv.to(tl.float32) + delta).to(yv.dtype), mask=out)

    @triton.jit
    def _rotate(x, heads, c1, c2, s1, s2, d, dm, HALF: tl.constexpr, P: tl.constexpr):
        """x's `heads` heads (one row, P >= heads) rotated in place: x1·cos1 − x2·sin1 and x2·cos2 + x1·sin2 for
        each head's halves x1, x2 (transformers' rotate_half), in float32, rounded once."""
        h = tl.arange(0, P)
        at = x + h[:, None] * (2 * HALF) + d[None, :]  # [P, DP]: first halves
        mask = (h[:, None] < heads) & dm[None, :]
        x1 = tl.load(at, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(at + HALF, mask=mask, other=0.0).to(tl.float32)
        tl.store(at, (x1 * c1 - x2 * s1).to(x.dtype.element_ty), mask=mask)
        tl.store(at + HALF, (x2 * c2 + x1 * s2).to(x.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope(q, q_row, q_heads, k, k_row, k_heads, cos, sin, cs_row, HALF: tl.constexpr, HP: tl.constexpr,
              KP: tl.constexpr, DP: tl.constexpr):  # fmt: skip
        """One row's q and k heads rotated in place by its cos and sin."""
        t = tl.program_id(0)
        d = tl.arange(0, DP)
        dm = d < HALF
        c1 = tl.load(cos + t * cs_row + d, mask=dm, other=0.0).to(tl.float32)[None, :]
        c2 = tl.load(cos + t * cs_row + HALF + d, mask=dm, other=0.0).to(tl.float32)[None, :]
        s1 = tl.load(sin + t * cs_row + d, mask=dm, other=0.0).to(tl.float32)[None, :]
        s2 = tl.load(sin + t * cs_row + HALF + d, mask=dm, other=0.0).to(tl.float32)[None, :]
        _rotate(q + t * q_row, q_heads, c1, c2, s1, s2, d, dm, HALF, HP)
        _rotate(k + t * k_row, k_heads, c1, c2, s1, s2, d, dm, HALF, KP)

    # The decode attention's tile (positions per iteration, any number of KV blocks) and warps are picked by
    # timing at first use per model shape, once, among these: the first is the kernel as first measured on an
    # H200 (one 16-position block per iteration, Triton's default 4 warps), the others read more positions per
    # iteration (more loads in flight) or spread them over more or fewer warps. (Which wins is not yet measured:
    # bench/gpu_check.py reports the choice and its time.)
    @triton.autotune(
        [triton.Config({"TILE": t}, num_warps=w) for t, w in
         ((16, 4), (16, 2), (32, 4), (64, 4), (64, 8), (128, 4), (128, 8))],
        key=["kv_row", "BS", "GROUP", "D"],
    )  # fmt: skip
    @triton.jit
    def _paged_decode(q, q_row, q_head, k, v, kv_row, kv_head, tables, table_row, lens, o, o_row, o_head, scale,
                      GROUP: tl.constexpr, G: tl.constexpr, BS: tl.constexpr, D: tl.constexpr,
                      TILE: tl.constexpr):  # fmt: skip
        """One sequence's GROUP query heads that share KV head `kvh`, over its positions TILE at a time (each
        position's row found through its block's table entry), with an online softmax."""
        seq, kvh = tl.program_id(0), tl.program_id(1)
        g = tl.arange(0, G)
        d = tl.arange(0, D)
        heads = kvh * GROUP + g
        qv = tl.load(q + seq * q_row + heads[:, None] * q_head + d[None, :], mask=g[:, None] < GROUP, other=0.0)
        qv = qv.to(tl.float32) * scale  # [G, D]
        n = tl.load(lens + seq)
        m = tl.full((G,), float("-inf"), tl.float32)
        total = tl.zeros((G,), dtype=tl.float32)
        acc = tl.zeros((G, D), dtype=tl.float32)
        for start in range(0, n, TILE):
            pos = start + tl.arange(0, TILE)
            live = pos < n
            block = tl.load(tables + seq * table_row + pos // BS, mask=live, other=0)
            rows = (block * BS + pos % BS)[:, None] * kv_row + kvh * kv_head + d[None, :]  # [TILE, D]
            kb = tl.load(k + rows, mask=live[:, None], other=0.0).to(tl.float32)
            s = tl.sum(qv[:, None, :] * kb[None, :, :], axis=2)  # [G, TILE]
            s = tl.where(live[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m - m_new)
            vb = tl.load(v + rows, mask=live[:, None], other=0.0).to(tl.float32)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * vb[None, :, :], axis=1)
            total = total * alpha + tl.sum(p, axis=1)
            m = m_new
        out = acc / total[:, None]
        dst = o + seq * o_row + heads[:, None] * o_head + d[None, :]
        tl.store(dst, out.to(o.dtype.element_ty), mask=g[:, None] < GROUP)


def lora_add(
    y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, table: torch.Tensor, slots: torch.Tensor,
    rank: int, fused: bool | None = None,
):  # fmt: skip
    """y [T, out] += (x A_slot[:rank]ᵀ) B_slot[:rank] per row; slots [T] int64 (-1: no adapter, row untouched);
    x [T, in], the pools a [P, in], b [P, out] and their table [S, R] (mux/lora/ops.py), rows contiguous.
    Accumulates in float32. fused: one kernel
    (`_lora_fused`) or two (`_lora_shrink`, `_lora_expand`); None: whichever was faster for this shape, timed
    at its first call outside a CUDA graph capture (before one, the two kernels)."""
    rows, in_features = x.shape
    out_features = b.shape[1]
    r = max(8, triton.next_power_of_2(rank))  # lanes past `rank` are masked
    many = int(rows > 32)  # the tuning key: a few rows or a batch
    if fused is None:
        fused = _fused_is_faster(y, x, a, b, table, slots, rank, (in_features, out_features, rank, many))
    if fused:
        _lora_fused[lambda meta: (rows, meta["N_SPLIT"])](
            x, x.stride(0), a, a.stride(0), b, b.stride(0), table, table.stride(0), slots, y, y.stride(0), rank,
            in_features, out_features, many, R=r,
        )  # fmt: skip
        return
    h = torch.zeros(rows, r, dtype=torch.float32, device=x.device)  # [T, r]
    _lora_shrink[lambda meta: (rows, meta["SPLIT_K"])](
        x, x.stride(0), a, a.stride(0), table, table.stride(0), slots, h, rank, in_features, many, R=r
    )
    _lora_expand[lambda meta: (rows, triton.cdiv(out_features, meta["BLOCK_N"]))](
        h, b, b.stride(0), table, table.stride(0), slots, y, y.stride(0), rank, out_features, many, R=r
    )


FUSED_TIMES: dict[tuple, tuple[float, float]] = {}  # (in, out, rank, many) -> ms of the two kernels, of the one


def _fused_is_faster(y, x, a, b, table, slots, rank: int, key: tuple) -> bool:
    """Time both paths on these tensors once per shape (each tuned first; y restored after), remember the times.
    Inside a capture (no timing possible), or off CUDA (Triton's interpreter, in the tests), an untimed shape
    takes the two kernels."""
    if (times := FUSED_TIMES.get(key)) is None:
        if y.device.type != "cuda" or torch.cuda.is_current_stream_capturing():
            return False
        from triton.testing import do_bench

        saved = y.clone()
        times = FUSED_TIMES[key] = tuple(
            do_bench(functools.partial(lora_add, y, x, a, b, table, slots, rank, fused), warmup=5, rep=20)
            for fused in (False, True)
        )  # do_bench's first call tunes that path's block shapes
        y.copy_(saved)
        log.info("LoRA add %s: two kernels %.4f ms, one %.4f ms", key, *times)
    return times[1] < times[0]


def rope_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int):
    """q [..., H*D] and k [..., Hkv*D] (contiguous, the same rows) rotated in place by cos/sin [rows, D] (row
    stride given by their last two dims: one row per token); one kernel for what transformers runs as ten.
    Returns (q, k)."""
    rows = q.numel() // q.shape[-1]
    q_heads, k_heads = q.shape[-1] // head_dim, k.shape[-1] // head_dim
    _rope[(rows,)](
        q, q.shape[-1], q_heads, k, k.shape[-1], k_heads, cos, sin, cos.shape[-1], HALF=head_dim // 2,
        HP=triton.next_power_of_2(q_heads), KP=triton.next_power_of_2(k_heads),
        DP=triton.next_power_of_2(head_dim // 2),
    )  # fmt: skip
    return q, k


def paged_decode(q, k_cache, v_cache, tables, lens, block_size: int, scale: float, out: torch.Tensor) -> None:
    """out[:B] = attention of the decode queries q [B, H, D] over each sequence's blocks; k/v_cache [rows, Hkv,
    D] (rows = blocks * block_size), tables [B, nb] int64 (entries past a sequence's length unread), lens [B]."""
    seqs, heads, head_dim = q.shape
    kv_heads = k_cache.shape[1]
    group = heads // kv_heads
    _paged_decode[(seqs, kv_heads)](
        q, q.stride(0), q.stride(1), k_cache, v_cache, k_cache.stride(0), k_cache.stride(1), tables,
        tables.stride(0), lens, out, out.stride(0), out.stride(1), scale,
        GROUP=group, G=triton.next_power_of_2(group), BS=block_size, D=head_dim,
    )  # fmt: skip
