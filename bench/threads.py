"""The one-torch-thread lever, side by side: requests through an engine whose torch work is all on one thread,
vs the same with a second OpenMP team in the process (what happened when the engine was built on one thread
and stepped on another, and what any other thread running a parallel torch op still causes).

Each case runs in its own process (an OpenMP team lives as long as its thread): 8 sequential SmolLM2 requests
with a rank-8 adapter, ≈30-token prompts, 32 greedy tokens; time to first token and total, best of 2 passes.

    python -m bench.threads
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import machine, percentile, prompts, save


def case(second_team: bool) -> dict:
    import torch

    from bench.common import write_random_adapter
    from mux.config import CacheConfig, EngineConfig
    from mux.engine.engine import Engine
    from mux.engine.sequence import SamplingParams
    from mux.model.loader import default_model_dir

    adapter = write_random_adapter(default_model_dir(), Path(tempfile.mkdtemp()) / "a", r=8, std=0.02)
    engine = Engine(EngineConfig(cache=CacheConfig(kv_cache_bytes=256 << 20, prefix_caching=False)))
    if second_team:  # a parallel op on this (main) thread: its OpenMP team stays for the life of the thread
        torch.randn(1024, 1024) @ torch.randn(1024, 1024)
    engine.start()
    texts, params = prompts(8), SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    ref = engine.prepare_adapter(adapter)
    best: dict = {}
    for _ in range(2):
        ttft, total = [], []
        for text in texts:
            t = time.perf_counter()
            events = iter(engine.submit(text, params, ref))
            next(events)
            ttft.append(time.perf_counter() - t)
            for _ in events:
                pass
            total.append(time.perf_counter() - t)
        if not best or sum(total) < best["total_s"]:
            best = {"ttft_p50_s": percentile(ttft, 0.5), "total_s": sum(total)}
    engine.stop()
    return best


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--case":
        print(json.dumps(case(sys.argv[2] == "two")))
        return
    results = {}
    for name in ("one", "two"):
        out = subprocess.run(
            [sys.executable, "-m", "bench.threads", "--case", name], capture_output=True, text=True, check=True
        )
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
        print(name, results[name], flush=True)
    one, two = results["one"], results["two"]
    m = machine()
    table = "\n".join(
        [
            "# One torch thread vs a second OpenMP team (SmolLM2, 8 sequential requests × 32 tokens, rank-8 adapter)",
            "",
            f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['device']}.",
            "",
            "| case | TTFT p50 (ms) | 8 requests (s) |",
            "|---|---|---|",
            f"| all torch work on the engine's thread | {one['ttft_p50_s'] * 1e3:.0f} | {one['total_s']:.2f} |",
            f"| a second OpenMP team in the process | {two['ttft_p50_s'] * 1e3:.0f} | {two['total_s']:.2f} |",
            "",
            f"One thread is **{two['total_s'] / one['total_s']:.2f}×** faster end to end, "
            f"{two['ttft_p50_s'] / one['ttft_p50_s']:.2f}× on time to first token.",
        ]
    )
    print(table)
    save("threads", {"machine": m, "results": results}, table)


if __name__ == "__main__":
    main()
