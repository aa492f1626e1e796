"""The step token budget, side by side: how long one long prompt holds other streams, and what a smaller budget
costs. One engine per budget in one process (one torch thread), runs interleaved.

Each run: 8 streams decode 48 tokens each (≈30-token prompts); 0.8 s in, a ≈1,300-token prompt arrives. Reported:
the streams' longest and median gap between tokens, the long prompt's time to first token, and the time to first
token of a burst of 64 short prompts (the cost side: more, smaller prefill steps).

    python -m bench.long_prompt [--budgets 2048,512,256 --repeat 2]
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

from bench.common import machine, prompts, save
from mux.config import CacheConfig, EngineConfig, SchedulerConfig
from mux.engine.engine import Engine
from mux.engine.sequence import SamplingParams
from mux.engine.torch_thread import TorchThread

STREAMS, LONG_TOKENS = 8, 1324


def one_run(engine: Engine, texts: list[str], long_ids: list[int]) -> dict:
    engine.start()
    gaps: list[float] = []

    def read(text: str) -> None:
        last = None
        for _ in engine.submit(text, SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)):
            now = time.perf_counter()
            if last is not None:
                gaps.append(now - last)
            last = now

    readers = [threading.Thread(target=read, args=(t,)) for t in texts[:STREAMS]]
    for r in readers:
        r.start()
    time.sleep(0.8)
    t = time.perf_counter()
    events = iter(engine.submit(long_ids, SamplingParams(max_tokens=2, temperature=0)))
    next(events)
    long_ttft = time.perf_counter() - t
    for _ in events:
        pass
    for r in readers:
        r.join()
    t = time.perf_counter()
    engine.generate(texts, SamplingParams(max_tokens=1, temperature=0))
    burst = time.perf_counter() - t
    engine.stop()
    return {"max_gap_s": max(gaps), "median_gap_s": statistics.median(gaps), "long_ttft_s": long_ttft, "burst_s": burst}


def run(thread: TorchThread, args) -> dict:
    """Engines built on `thread` (one OpenMP team); the runs are driven from the caller's thread."""
    budgets = [int(b) for b in args.budgets.split(",")]
    engines = {
        b: Engine(
            EngineConfig(
                cache=CacheConfig(kv_cache_bytes=1 << 30, prefix_caching=False),
                scheduler=SchedulerConfig(max_num_batched_tokens=b),
            ),
            torch_thread=thread,
        )
        for b in budgets
    }
    texts = prompts(64)
    long_ids = engines[budgets[0]].tokenizer(" ".join(prompts(60, words=20, seed=5))).input_ids[:LONG_TOKENS]
    results: dict[int, list[dict]] = {b: [] for b in budgets}
    for rnd in range(args.repeat):
        for b, engine in engines.items():
            results[b].append(one_run(engine, texts, long_ids))
            line = ", ".join(f"{k} {v:.3f}" for k, v in results[b][-1].items())
            print(f"[{rnd + 1}/{args.repeat}] budget {b}: {line}", flush=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", default="2048,512,256")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    results = run(TorchThread("bench"), args)  # from this thread: each engine's loop runs on the torch thread
    m = machine()

    def span(b: int, key: str) -> str:
        values = [r[key] * 1e3 for r in results[b]]
        return f"{min(values):.0f}–{max(values):.0f}"

    keys = ("max_gap_s", "median_gap_s", "long_ttft_s", "burst_s")
    rows = [f"| {b} | " + " | ".join(span(b, k) for k in keys) + " |" for b in results]
    table = "\n".join(
        [
            f"# The step token budget: {STREAMS} decoding streams while a {LONG_TOKENS}-token prompt arrives (SmolLM2)",
            "",
            f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['device']}. {args.repeat} interleaved "
            "rounds; ranges over the rounds, ms.",
            "",
            "| budget (tokens a step) | streams' longest gap | median gap | long prompt TTFT | 64-prompt burst |",
            "|---|---|---|---|---|",
            *rows,
        ]
    )
    print(table)
    save("long-prompt", {"machine": m, "args": vars(args), "results": results}, table)


if __name__ == "__main__":
    main()
