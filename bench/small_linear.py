"""The CPU linears side by side: oneDNN's prepacked GEMM vs the C kernel of mux/csrc/linear.c over weights packed
in panels, both fp32 (two of the kernels mux/model/linear_picks.py picks from; forced here).

1. Every linear of a SmolLM2-shaped model (30 layers × 7 + the lm_head, 538 MB of fp32 weights, so each pass
   streams them from memory, as a decode step does), at 1-64 rows (decode steps of as many sequences) and 256
   (a prefill chunk): ms per pass, the GB/s of weights it reads and the GFLOP/s, and the machine's read speed
   beside it (a sum over 512 MB).
2. The engine (SmolLM2, one rank-8 adapter per stream, greedy): ms per decode step at 1, 2, 4, 8 and 16 concurrent
   streams, four engines in interleaved rounds: the default (decode steps without transformers' forward,
   mux/engine/cpu_decode.py: ≤ 8 sequences as one loop of C calls, each linear with its
   LoRA deltas in one call; more as calls of the C linears and the LoRA kernel); the same kernels through
   transformers' forward; the linear then the LoRA kernel (two calls, forced "lora_fused" = "two_calls", through
   transformers' forward); oneDNN's linears (forced, through transformers' forward);
   and the base model's step (no adapter) on the first, for what the adapters cost; whether all give the same
   tokens.

Best of interleaved repetitions (this machine is noisy). Run: python -m bench.small_linear [--rounds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from bench.common import best_time, machine, prompts, save, write_random_adapter
from mux.config import CacheConfig, EngineConfig, ModelConfig
from mux.engine.engine import Engine
from mux.engine.sequence import SamplingParams
from mux.engine.torch_thread import TorchThread
from mux.model.cpu import PackedLinear
from mux.model.loader import default_model_dir
from mux.runtime import picks

HIDDEN, INTER, Q, KV, LAYERS, VOCAB = 576, 1536, 576, 192, 30, 49152
ROWS = (1, 2, 3, 4, 6, 8, 16, 32, 64, 256)
SHAPES = [(HIDDEN, Q), (HIDDEN, KV), (HIDDEN, KV), (Q, HIDDEN), (HIDDEN, INTER), (HIDDEN, INTER), (INTER, HIDDEN)]


def linears(rounds: int) -> dict:
    torch.manual_seed(0)
    shapes = SHAPES * LAYERS + [(HIDDEN, VOCAB)]
    plain = [nn.Linear(i, o, bias=False) for i, o in shapes]
    nbytes = sum(m.weight.numel() * 4 for m in plain)
    panels, packed = [PackedLinear(m, "c") for m in plain], [PackedLinear(m, "onednn") for m in plain]
    flops = 2 * nbytes / 4
    big = torch.randn(128 << 20)  # 512 MB
    read_gbs = big.numel() * 4 / best_time(big.sum, 5) / 1e9
    out: dict = {"weights_mb": nbytes / 1e6, "read_gb_s": read_gbs, "rows": {}}
    for rows in ROWS:
        xs = {f: torch.randn(rows, f) for f in (HIDDEN, INTER)}
        ms = {"C kernel": float("inf"), "oneDNN packed": float("inf")}
        for _ in range(rounds):
            for label, layers in (("C kernel", panels), ("oneDNN packed", packed)):
                run = lambda ls=layers, xs=xs: [m(xs[m.in_features]) for m in ls]  # noqa: E731
                ms[label] = min(ms[label], best_time(run, 3) * 1e3)
        out["rows"][rows] = {
            k: {"ms": v, "gb_s": nbytes / v / 1e6, "gflop_s": rows * flops / v / 1e6} for k, v in ms.items()
        }
        print(rows, json.dumps(out["rows"][rows]), flush=True)
    return out


def engines(rounds: int, thread: TorchThread) -> dict:
    with tempfile.TemporaryDirectory(prefix="mux-small-linear-") as work:  # the adapters, removed after
        return _engines(rounds, thread, Path(work))


def _engines(rounds: int, thread: TorchThread, work: Path) -> dict:
    model_dir = default_model_dir()
    paths = [str(write_random_adapter(model_dir, work / f"a{i}", r=8, seed=i)) for i in range(16)]
    variants = {  # name: (the C linears, each with its deltas in one call at <= 8 rows, the loop of C calls)
        "loop": (True, True, True),
        "transformers": (True, True, False),
        "two calls": (True, False, False),
        "oneDNN": (False, False, False),
    }
    built = {}
    for name, (c, fused, loop) in variants.items():
        forced = {"linear": "c" if c else "onednn", "decode": "loop" if loop else "forward"}
        forced["lora_fused"] = "fused" if fused else "two_calls"
        with contextlib.ExitStack() as stack:
            for op, value in forced.items():
                stack.enter_context(picks.force(op, value))
            built[name] = Engine(
                EngineConfig(
                    model=ModelConfig(model=str(model_dir)),
                    cache=CacheConfig(kv_cache_bytes=1 << 28, prefix_caching=False),
                ),
                torch_thread=thread,
            )
    runs = [(name, engine, True) for name, engine in built.items()] + [("no adapter", built["loop"], False)]
    texts = prompts(16)
    out: dict = {"streams": {}, "same_tokens": True}
    for streams in (1, 2, 4, 8, 16):
        ms = {name: float("inf") for name, _, _ in runs}
        tokens = {}
        for engine in built.values():
            decode(engine, texts[:streams], paths[:streams], 2)  # warm-up: adapters resident
        for _ in range(rounds):
            for name, engine, with_adapters in runs:
                adapters = paths[:streams] if with_adapters else [None] * streams
                step_ms, tokens[name] = decode(engine, texts[:streams], adapters, 33)
                ms[name] = min(ms[name], step_ms)
        out["same_tokens"] &= all(tokens[name] == tokens["loop"] for name in variants)
        out["streams"][streams] = ms
        print(streams, json.dumps(ms), flush=True)
    return out


def decode(engine: Engine, texts, adapters, new: int) -> tuple[float, list]:
    """(ms per decode step, the tokens): the run's time less its prefill's (the same prompts, one token)."""
    t = time.perf_counter()
    engine.generate(texts, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True), adapters)
    prefill = time.perf_counter() - t
    t = time.perf_counter()
    outs = engine.generate(texts, SamplingParams(max_tokens=new, temperature=0, ignore_eos=True), adapters)
    return (time.perf_counter() - t - prefill) / (new - 1) * 1e3, [o.token_ids for o in outs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best of each is kept")
    args = ap.parse_args()
    thread = TorchThread("bench")  # one OpenMP team for every torch call here, as in the engine
    data = {"machine": machine(), "linears": thread.call(linears, args.rounds), "engine": engines(args.rounds, thread)}
    lin, eng = data["linears"], data["engine"]
    lines = [
        "# CPU linears: the C kernel (weights in panels) vs oneDNN's prepacked GEMM",
        "",
        f"Machine: {data['machine']}",
        "",
        f"1. Every linear of a SmolLM2-shaped model ({lin['weights_mb']:.0f} MB of fp32 weights) per pass; the "
        f"machine reads {lin['read_gb_s']:.0f} GB/s (a sum over 512 MB).",
        "",
        "| rows | C kernel ms (GB/s, GFLOP/s) | oneDNN packed ms (GB/s, GFLOP/s) | C vs oneDNN |",
        "|---|---|---|---|",
    ]
    for rows, r in lin["rows"].items():
        c, p = r["C kernel"], r["oneDNN packed"]
        lines.append(
            f"| {rows} | {c['ms']:.1f} ({c['gb_s']:.0f}, {c['gflop_s']:.0f}) | {p['ms']:.1f} ({p['gb_s']:.0f}, "
            f"{p['gflop_s']:.0f}) | "
            f"**{p['ms'] / c['ms']:.2f}×** |"
        )
    lines += [
        "",
        f"2. The engine (SmolLM2, one rank-8 adapter per stream, greedy), ms per decode step, best of "
        f"{args.rounds} interleaved rounds; the same tokens on all four: {eng['same_tokens']}. Loop = the default: "
        "decode steps without transformers' forward (mux/engine/cpu_decode.py; ≤ 8 sequences as one loop of C "
        "calls, each linear with its LoRA deltas in one call; more: the C linears, then the LoRA kernel); transformers "
        "= the same kernels through transformers' forward; two calls = the C linear, then the LoRA kernel (through "
        "transformers' forward); oneDNN = oneDNN's linears through transformers' forward; no adapter = the loop on "
        "the base model (the "
        "adapters' cost is the difference).",
        "",
        "| streams | loop | transformers | two calls | oneDNN | no adapter | loop vs transformers | vs two calls "
        "| vs oneDNN |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for streams, r in eng["streams"].items():
        f, t, c, p, base = (r[k] for k in ("loop", "transformers", "two calls", "oneDNN", "no adapter"))
        lines.append(
            f"| {streams} | {f:.1f} | {t:.1f} | {c:.1f} | {p:.1f} | {base:.1f} | **{t / f:.2f}×** | **{c / f:.2f}×** "
            f"| **{p / f:.2f}×** |"
        )
    save("small-linear", data, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
