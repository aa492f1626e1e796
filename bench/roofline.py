"""How close batch-64 decode gets to this machine's fp32 matmul roofline, measured in the same run.

Roofline: the best GFLOP/s of a large square fp32 GEMM. Decode: 64 concurrent SmolLM2 requests (≈30-token
prompts) decoding `--new-tokens` greedy tokens, with and without 16 rank-8 adapters; only decode steps are
timed (the prefill steps are left out). FLOPs per decoded token = 2 × the weights of every linear layer incl.
the lm_head; LoRA and attention over ≤100 positions are left out, so the figure slightly understates the work.
Target (issue 6): ≥ 40% of the roofline.

    python -m bench.roofline [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from bench.common import machine, prompts, save, write_random_adapter
from mux.config import CacheConfig, EngineConfig, LoRAConfig
from mux.engine.engine import Engine
from mux.engine.sequence import SamplingParams
from mux.engine.torch_thread import TorchThread
from mux.model.loader import default_model_dir


def gemm_gflops(n: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def linear_flops_per_token(model: nn.Module) -> int:
    """2 × in × out for every linear layer (the LoRA wrappers' base linears and the lm_head), as dense GEMMs."""
    total = 0
    for module in model.modules():
        if hasattr(module, "in_features") and hasattr(module, "out_features") and not list(module.children()):
            total += 2 * module.in_features * module.out_features
    return total


def decode_rate(engine: Engine, texts: list[str], new_tokens: int, adapters: list) -> float:
    """Decoded tokens per second over the decode steps only (after every prompt has been prefilled)."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    streams = [engine.submit(t, params, a) for t, a in zip(texts, adapters, strict=True)]
    while any(s.num_tokens == 0 and not s.finished for s in streams):  # prefill: every request has a token
        engine.step()
    t, steps = time.perf_counter(), 0
    while engine.step():
        steps += 1
    elapsed = time.perf_counter() - t
    return steps * len(texts) / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    thread = TorchThread("bench")  # one OpenMP team for everything measured
    thread.call(run, thread, args)


def run(thread: TorchThread, args) -> None:
    model_dir = default_model_dir()
    root = Path(tempfile.mkdtemp(prefix="mux-roofline-"))
    paths = [write_random_adapter(model_dir, root / f"a{i}", r=8, seed=i, std=0.02) for i in range(16)]
    engine = Engine(
        EngineConfig(cache=CacheConfig(kv_cache_bytes=1 << 30, prefix_caching=False), lora=LoRAConfig()),
        torch_thread=thread,
    )
    texts = prompts(args.batch)
    per_request = [paths[i % len(paths)] for i in range(args.batch)]
    decode_rate(engine, texts[:16], 4, paths)  # warm-up: adapters resident, allocator warm
    peak = max(gemm_gflops() for _ in range(2))
    flops = linear_flops_per_token(engine.base.model)
    base_rate = max(decode_rate(engine, texts, args.new_tokens, [None] * args.batch) for _ in range(2))
    lora_rate = max(decode_rate(engine, texts, args.new_tokens, per_request) for _ in range(2))
    results = {
        "gemm_gflops": peak,
        "gflop_per_token": flops / 1e9,
        "decode_tok_s_base": base_rate,
        "decode_tok_s_16_adapters": lora_rate,
        "roofline_fraction_base": base_rate * flops / 1e9 / peak,
        "roofline_fraction_16_adapters": lora_rate * flops / 1e9 / peak,
    }
    m = machine()
    table = "\n".join(
        [
            f"# Roofline: batch-{args.batch} decode vs a 2048³ fp32 GEMM (SmolLM2-135M, fp32)",
            "",
            f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['device']}. Target: ≥ 40%.",
            "",
            "| figure | value |",
            "|---|---|",
            f"| GEMM roofline | {peak:.0f} GFLOP/s |",
            f"| linear FLOPs per token | {flops / 1e9:.3f} GFLOP |",
            f"| decode, base only | {base_rate:.0f} tok/s = {results['roofline_fraction_base']:.0%} of the roofline |",
            f"| decode, 16 rank-8 adapters | {lora_rate:.0f} tok/s = "
            f"{results['roofline_fraction_16_adapters']:.0%} (base FLOPs only) |",
        ]
    )
    print(table)
    save("roofline", {"machine": m, "workload": vars(args), "results": results}, table)


if __name__ == "__main__":
    main()
