"""The decode-attention lever, side by side: the C kernel vs mux_attention's SDPA path vs the one that replaced.

- C (`mux/csrc/attention.c`, the CPU float32 default): each sequence's blocks read in place, one work item per
  (sequence, KV head) with its query heads scored together;
- SDPA (forced: `picks.force("attention", "sdpa")`): blocks gathered with `index_select`, the query heads of one KV
  head folded into that head's query rows (no K/V expansion);
- before (commit 3f619b0): blocks gathered with advanced indexing (`cache[tables]`), SDPA with `enable_gqa=True`.

All three write the step's new K/V the same way. SmolLM2 shapes (9 query
heads over 3 KV heads, head dim 64, 16-token blocks), 30 layers' caches cycled so K/V come from memory, 64
sequences with 40–100 cached tokens.

Beside it, the prefill lever: 16 prompts of 30 tokens with no cached prefix, one SDPA call per prompt (as
before) vs one call for all of them (`PrefillGroup`, what the runner now builds). Run: python -m bench.attention
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from bench.common import machine, save
from mux.engine.kv_cache import AttentionMetadata, KVCache, PrefillGroup, PrefillSpan, mux_attention
from mux.engine.torch_thread import TorchThread

LAYERS, HEADS, KV_HEADS, HEAD_DIM, BLOCK = 30, 9, 3, 64, 16


def before(module, query, key, value, meta: AttentionMetadata, scaling: float) -> torch.Tensor:
    """The decode path as it was (commit 3f619b0), writes included."""
    cache, bs = meta.cache, meta.cache.block_size
    k_cache, v_cache = cache.k[module.layer_idx], cache.v[module.layer_idx]
    k_cache.index_copy_(0, meta.slot_mapping, key[0].transpose(0, 1))
    v_cache.index_copy_(0, meta.slot_mapping, value[0].transpose(0, 1))
    b, tables = meta.num_decode, meta.decode_tables
    shape = (b, tables.shape[1] * bs, k_cache.shape[1], k_cache.shape[2])
    kd = k_cache.view(-1, bs, *k_cache.shape[1:])[tables].view(shape).transpose(1, 2)
    vd = v_cache.view(-1, bs, *v_cache.shape[1:])[tables].view(shape).transpose(1, 2)
    qd = query[0].transpose(0, 1).unsqueeze(2)  # [B, H, 1, D]
    o = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=meta.decode_mask, scale=scaling, enable_gqa=True)
    return o.squeeze(2).unsqueeze(0)


def run(batch: int = 64) -> dict:
    torch.manual_seed(0)
    blocks_per_seq = 7
    blocks = batch * blocks_per_seq + 8
    caches = {c: KVCache(LAYERS, blocks, BLOCK, KV_HEADS, HEAD_DIM, torch.float32, "cpu", c) for c in (False, True)}
    cache = caches[False]
    cache.k.normal_()
    cache.v.normal_()
    caches[True].k.copy_(cache.k)
    caches[True].v.copy_(cache.v)
    lens = torch.randint(40, 100, (batch,))
    perm = torch.randperm(cache.num_blocks)[: batch * blocks_per_seq].view(batch, blocks_per_seq)
    nb = int((lens.max() + BLOCK - 1) // BLOCK)
    tables = perm[:, :nb]  # [B, nb] scattered blocks, as after many allocations
    slot_mapping = tables[torch.arange(batch), (lens - 1) // BLOCK] * BLOCK + (lens - 1) % BLOCK
    mask = (torch.arange(nb * BLOCK)[None, :] < lens[:, None])[:, None, None, :]
    meta = AttentionMetadata(cache, slot_mapping, batch, tables, mask, (), lens)
    native_meta = replace(meta, cache=caches[True])
    query = torch.randn(1, HEADS, batch, HEAD_DIM)
    key, value = torch.randn(1, KV_HEADS, batch, HEAD_DIM), torch.randn(1, KV_HEADS, batch, HEAD_DIM)
    modules = [SimpleNamespace(layer_idx=i) for i in range(LAYERS)]
    scale = HEAD_DIM**-0.5

    def sdpa():
        return [mux_attention(m, query, key, value, None, scaling=scale, mux_attn=meta)[0] for m in modules]

    def c_kernel():
        return [mux_attention(m, query, key, value, None, scaling=scale, mux_attn=native_meta)[0] for m in modules]

    def then():
        return [before(m, query, key, value, meta, scale) for m in modules]

    paths = {"before": then, "sdpa": sdpa}
    if caches[True].native:
        paths["c"] = c_kernel
    ref = then()
    err = {k: max((a - b).abs().max().item() for a, b in zip(fn(), ref, strict=True)) for k, fn in paths.items()}
    times: dict[str, list[float]] = {label: [] for label in paths}
    for _ in range(7):  # interleaved, best of each
        for label, fn in paths.items():
            t = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - t)
    best = {label: min(v) / LAYERS * 1e6 for label, v in times.items()}
    return {"batch": batch, "us_per_layer": best, "max_abs_diff_vs_before": err}


def run_prefill(prompts: int = 16, tokens: int = 30) -> dict:
    """µs per layer of mux_attention over equal-length prefills: a span each vs one group."""
    torch.manual_seed(0)
    rows = prompts * tokens
    cache = KVCache(LAYERS, rows // BLOCK + 8, BLOCK, KV_HEADS, HEAD_DIM, torch.float32, "cpu")
    slot_mapping = torch.arange(rows)
    spans = tuple(PrefillSpan(i * tokens, tokens, tokens, None) for i in range(prompts))
    metas = {
        "per_prompt": AttentionMetadata(cache, slot_mapping, 0, None, None, spans, None),
        "grouped": AttentionMetadata(
            cache, slot_mapping, 0, None, None, (), None, (PrefillGroup(torch.arange(rows), prompts, tokens),)
        ),
    }
    query = torch.randn(1, HEADS, rows, HEAD_DIM)
    key, value = torch.randn(1, KV_HEADS, rows, HEAD_DIM), torch.randn(1, KV_HEADS, rows, HEAD_DIM)
    modules = [SimpleNamespace(layer_idx=i) for i in range(LAYERS)]
    scale = HEAD_DIM**-0.5
    outs = {k: [mux_attention(m, query, key, value, None, scaling=scale, mux_attn=meta)[0] for m in modules]
            for k, meta in metas.items()}  # fmt: skip
    err = max((a - b).abs().max().item() for a, b in zip(outs["grouped"], outs["per_prompt"], strict=True))
    times: dict[str, list[float]] = {k: [] for k in metas}
    for _ in range(7):  # interleaved, best of each
        for label, meta in metas.items():
            t = time.perf_counter()
            for m in modules:
                mux_attention(m, query, key, value, None, scaling=scale, mux_attn=meta)
            times[label].append(time.perf_counter() - t)
    best = {label: min(v) / LAYERS * 1e6 for label, v in times.items()}
    return {"prompts": prompts, "tokens": tokens, "us_per_layer": best, "max_abs_diff": err}


def main() -> None:
    results = TorchThread("bench").call(run)
    results["prefill"] = TorchThread("bench-prefill").call(run_prefill)
    print(json.dumps(results), flush=True)
    t, err = results["us_per_layer"], results["max_abs_diff_vs_before"]
    pre = results["prefill"]["us_per_layer"]
    names = {
        "before": "before: advanced-index gather, SDPA enable_gqa",
        "sdpa": "SDPA path: index_select gather, query heads folded per KV head",
        "c": "C kernel: blocks read in place (the CPU default)",
    }
    table = "\n".join(
        [
            f"# Decode attention, {results['batch']} sequences (SmolLM2 shapes, 30 layers' caches)",
            "",
            f"Machine: {json.dumps(machine())}",
            "",
            "| decode path | µs per layer | vs before | max abs diff vs before |",
            "|---|---|---|---|",
            *(f"| {names[k]} | {v:.0f} | {t['before'] / v:.2f}× | {err[k]:.1e} |" for k, v in t.items()),
            "",
            f"Prefill, {results['prefill']['prompts']} prompts × {results['prefill']['tokens']} tokens, no cached "
            f"prefix: {pre['per_prompt']:.0f} µs per layer with an SDPA call per prompt, {pre['grouped']:.0f} with "
            f"one call for all (**{pre['per_prompt'] / pre['grouped']:.2f}×**; max abs diff "
            f"{results['prefill']['max_abs_diff']:.1e})",
        ]
    )
    print("wrote", save("attention", {"machine": machine(), **results}, table))


if __name__ == "__main__":
    main()
