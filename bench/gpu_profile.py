"""Where a GPU check's time goes (bench/gpu_check.py): throughput of a whole traffic, per-phase step times, and
device times of the step's kernels and captured decode graphs."""

from __future__ import annotations

import time
from types import SimpleNamespace

import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from mux import triton_ops
from mux.engine.engine import Engine
from mux.engine.kv_cache import AttentionMetadata, KVCache, decode_mask, mux_attention
from mux.model.cuda import FusedRMSNorm


def rate(engine: Engine, prompts, params, adapters, tokens: int, reps: int) -> float:
    """The best tokens/s of `reps` runs of the whole traffic."""
    best = 0.0
    for _ in range(reps):
        t = time.perf_counter()
        engine.generate(prompts, params, adapters)
        best = max(best, tokens / (time.perf_counter() - t))
    return best


def step_breakdown(engine: Engine, prompts, params, adapters) -> dict:
    """ms per step in each phase, prefill and decode steps apart. The forward is synchronised, so it holds the
    device's time too (the sampler's copy of the tokens to the host would wait for it anyway); with
    overlap_output that sync also undoes the overlap, and push_pending shows the host time it hides."""
    sync = torch.cuda.synchronize if engine.runner.device.type == "cuda" else (lambda: None)
    steps: list[dict] = []
    originals = {"schedule": engine.scheduler.schedule, "run": engine.runner.run, "sample": engine.sampler.sample}
    post, push = engine._postprocess, engine._push_pending

    def timed(name, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            out = fn(*a, **k)
            if name == "run":
                sync()
                steps[-1]["kind"] = "decode" if all(x.num_tokens == 1 for x in a[0]) else "prefill"
            steps[-1][name] = time.perf_counter() - t
            return out

        return wrapper

    def schedule():
        steps.append({})
        return timed("schedule", originals["schedule"])()

    engine.scheduler.schedule, engine.runner.run = schedule, timed("run", originals["run"])
    engine.sampler.sample, engine._postprocess = timed("sample", originals["sample"]), timed("postprocess", post)
    engine._push_pending = timed("push_pending", push)  # with overlap_output: the last step's text, during this one
    try:
        engine.generate(prompts, params, adapters)
    finally:  # the instance attributes go; the methods show through again
        del engine.scheduler.schedule, engine.runner.run, engine.sampler.sample, engine._postprocess
        del engine._push_pending
    out = {}
    for kind in ("prefill", "decode"):
        mine = [x for x in steps if x.get("kind") == kind]
        if mine:
            row = {
                name: 1000 * sum(x.get(name, 0.0) for x in mine) / len(mine)
                for name in ("schedule", "run", "push_pending", "sample", "postprocess")
            }
            row["postprocess"] -= row["sample"]  # the sampler runs inside postprocess
            out[kind] = {"steps": len(mine), **{f"{k}_ms": round(v, 2) for k, v in row.items()}}
    return out


def kernel_times(device: str, graphs) -> dict:
    """Device ms of the step's pieces at 7B shapes, 256 rows, each timed as 20 calls captured in one CUDA graph
    (no launch cost): a 4096×4096 base linear, an RMSNorm (transformers' and the fused one the engine uses on
    CUDA), RoPE on a layer's q and k (transformers' ops and the Triton kernel), the per-token LoRA add over 5 and
    over 256 distinct slots (Triton: the pick, its two kernels and its one kernel; and torch's gather), paged
    decode attention at 96 positions (Triton: the tuned pick, and each of its configs alone; and the SDPA path
    it replaces); and the replay of each captured 256-row decode graph (with and without LoRA: the difference
    is what the adapters cost a step)."""
    from mux.lora.ops import _per_token_add_

    def ms(fn, reps: int = 20) -> float:
        for _ in range(3):
            fn()  # compiles and tunes outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(reps):
                fn()
        return round(replay_ms(graph, 5) / reps, 4)

    def replay_ms(graph, reps: int) -> float:
        graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / reps

    g = torch.Generator(device=device).manual_seed(0)
    rows, width, rank, slots = 256, 4096, 8, 1000
    x = torch.randn(rows, width, device=device, dtype=torch.float16, generator=g)
    w = torch.randn(width, width, device=device, dtype=torch.float16, generator=g)
    a = torch.randn(slots * rank, width, device=device, dtype=torch.float16, generator=g)  # the pools
    b = torch.randn(slots * rank, width, device=device, dtype=torch.float16, generator=g)
    table = torch.randperm(slots * rank, device=device).view(slots, rank)  # rank rows scattered, as pages lie
    y = torch.zeros(rows, width, device=device, dtype=torch.float16)
    out = {"base_linear_4096": ms(lambda: x @ w.T)}
    norm = LlamaRMSNorm(width, eps=1e-5).to(device, torch.float16)  # 65 a 7B decode step: transformers' vs fused
    out["rms_norm_transformers_4096"] = ms(lambda: norm(x))
    out["rms_norm_fused_4096"] = ms(lambda: FusedRMSNorm(norm)(x))
    # RoPE on a 7B layer's q and k (32 heads of 128 each, 256 rows): transformers' ops vs the one Triton kernel
    qk = torch.randn(2, 1, rows, width, device=device, dtype=torch.float16, generator=g)  # [2, B=1, T, H*D]
    angles = torch.randn(1, rows, 64, device=device, generator=g).repeat(1, 1, 2)
    cos, sin = angles.cos().half(), angles.sin().half()  # [1, T, 128]
    heads = qk.view(2, 1, rows, 32, 128).transpose(2, 3)  # [2, B, H, T, D]
    out["rope_transformers_32x128"] = ms(lambda: apply_rotary_pos_emb(heads[0], heads[1], cos, sin))
    out["rope_triton_32x128"] = ms(lambda: triton_ops.rope_(qk[0], qk[1], cos[0], sin[0], 128))
    for name, idx in (("5_slots", torch.arange(rows) % 5), ("256_slots", torch.arange(rows) * 3 % slots)):
        idx = idx.to(device)
        out[f"lora_triton_{name}"] = ms(lambda idx=idx: triton_ops.lora_add(y, x, a, b, table, idx, rank))  # the pick
        for label, fused in (("two_kernels", False), ("one_kernel", True)):  # what the pick chose between
            out[f"lora_triton_{label}_{name}"] = ms(
                lambda idx=idx, f=fused: triton_ops.lora_add(y, x, a, b, table, idx, rank, f)
            )
        out[f"lora_torch_gather_{name}"] = ms(lambda idx=idx: _per_token_add_(y, x, a, b, table, idx, rank))
    bs, heads, head_dim, ctx = 16, 32, 128, 96
    nb = ctx // bs
    k = torch.randn((rows * nb + 1) * bs, heads, head_dim, device=device, dtype=torch.float16, generator=g)
    tables = torch.randperm(rows * nb, device=device).view(rows, nb)
    lens = torch.full((rows,), ctx, device=device)
    q = torch.randn(rows, heads, head_dim, device=device, dtype=torch.float16, generator=g)
    o = torch.empty_like(q)
    attend = lambda: triton_ops.paged_decode(q, k, k, tables, lens, bs, head_dim**-0.5, o)  # noqa: E731
    out["paged_decode_96"] = ms(attend)  # the config the first call's timing picked
    kernel = triton_ops._paged_decode
    out["paged_decode_96_config"] = str(kernel.best_config)
    configs, cache = kernel.configs, kernel.cache
    for config in configs:  # each config alone, in a graph as above: what the pick chose among
        kernel.configs, kernel.cache = [config], {}
        out[f"paged_decode_96_tile{config.kwargs['TILE']}_warps{config.num_warps}"] = ms(attend)
    kernel.configs, kernel.cache = configs, cache
    # its baseline: the engine's attention without Triton (blocks gathered, SDPA), writes of the new K/V included
    cache = KVCache(1, rows * nb, bs, heads, head_dim, torch.float16, device)
    cache.paged = False
    new_rows = tables[:, -1] * bs + bs - 1  # each sequence's last position
    meta = AttentionMetadata(cache, new_rows, rows, tables, decode_mask(lens, ctx), (), lens)
    qh = q.transpose(0, 1)[None]  # [1, H, B, D], as the model's attention hands it over
    kv = torch.randn(1, heads, rows, head_dim, device=device, dtype=torch.float16, generator=g)
    layer = SimpleNamespace(layer_idx=0)
    out["sdpa_gather_decode_96"] = ms(lambda: mux_attention(layer, qh, kv, kv, None, mux_attn=meta))
    for key, captured in sorted(graphs._graphs.items(), key=str) if graphs is not None else ():
        if key[0] == rows and captured.graph is not None:
            lora = f"lora_rank{key[2]}_{'all' if key[4] is None else len(key[4])}_linears" if key[3] else "no_lora"
            out[f"decode_graph_{key[0]}x{key[1]}_{lora}"] = round(replay_ms(captured.graph, 5), 3)
    return out
