"""Serving over HTTP (issue 6, workloads C and D), side by side with the engine called directly.

C: 64 concurrent streaming completions × 64 tokens over 16 rank-8 adapters through the real `openai` client
   against a loopback `mux serve`, vs the same traffic submitted to an in-process engine. Target ≥ 0.9×.
D: Poisson arrivals keeping about 1, 8 and 32 streams busy (each level's rate set from the single-stream speed
   and the measured HTTP throughput, at 90% load): time to first token and inter-token latency p50/p99, next to
   the time of one prefill forward of the same prompt alone. Target: TTFT p50 at 8 streams ≤ 2× that prefill.

    python -m bench.serving [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import random
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from bench.common import machine, percentile, prompts, save, write_random_adapter
from mux.model.loader import default_model_dir

NEW_TOKENS = 64


async def stream_one(client, model: str, prompt: str, max_tokens: int) -> tuple[float, list[float], int]:
    """(TTFT, inter-token gaps, tokens) of one streamed completion."""
    t0 = time.perf_counter()
    times = []
    stream = await client.completions.create(
        model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True, extra_body={"ignore_eos": True}
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            times.append(time.perf_counter())
    gaps = [b - a for a, b in itertools.pairwise(times)]
    return (times[0] - t0 if times else float("nan")), gaps, len(times)


async def http_throughput(base: str, models: list[str], texts: list[str]) -> float:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=600)
    t = time.perf_counter()
    results = await asyncio.gather(*(stream_one(client, m, p, NEW_TOKENS) for m, p in zip(models, texts, strict=True)))
    elapsed = time.perf_counter() - t
    await client.close()
    return sum(n for _, _, n in results) / elapsed


def engine_throughput(model_dir: Path, paths: list[Path], texts: list[str]) -> tuple[float, float]:
    """(tok/s of the same traffic on an in-process engine, seconds of one prefill of texts[0] alone)."""
    from mux.config import CacheConfig, EngineConfig
    from mux.engine.engine import Engine
    from mux.engine.sequence import SamplingParams

    engine = Engine(EngineConfig(cache=CacheConfig(kv_cache_bytes=1 << 30)))
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    engine.generate(texts[: len(paths)], SamplingParams(max_tokens=2, temperature=0), paths)  # adapters resident
    engine.start()
    best = 0.0
    for _ in range(2):
        t = time.perf_counter()
        streams = [engine.submit(p, params, paths[i % len(paths)]) for i, p in enumerate(texts)]
        tokens = sum(len(s.result().token_ids) for s in streams)
        best = max(best, tokens / (time.perf_counter() - t))
    prefill = []
    for _ in range(5):  # one request alone: its first token is exactly one prefill forward (+ sampling)
        t = time.perf_counter()
        next(iter(engine.submit(texts[0], SamplingParams(max_tokens=1, temperature=0), paths[0])))
        prefill.append(time.perf_counter() - t)
    engine.stop()
    return best, min(prefill)


async def poisson(base: str, models: list[str], texts: list[str], streams: int, n: int, service_s: float) -> dict:
    """About `streams` concurrent streams: arrivals every service_s/streams on average (exponential gaps)."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=600)
    rnd = random.Random(streams)
    tasks = []
    for i in range(n):
        tasks.append(asyncio.create_task(stream_one(client, models[i % len(models)], texts[i % len(texts)], 32)))
        await asyncio.sleep(rnd.expovariate(streams / service_s))
    results = await asyncio.gather(*tasks)
    await client.close()
    ttft = [r[0] for r in results]
    gaps = [g for r in results for g in r[1]]
    return {
        "streams": streams,
        "requests": n,
        "ttft_p50_s": percentile(ttft, 0.5),
        "ttft_p99_s": percentile(ttft, 0.99),
        "itl_p50_s": percentile(gaps, 0.5),
        "itl_p99_s": percentile(gaps, 0.99),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from conftest import start_server

    model_dir = default_model_dir()
    root = Path(tempfile.mkdtemp(prefix="mux-serving-")) / "repo"
    paths = [write_random_adapter(model_dir, root / "bench" / f"a{i}", r=8, seed=i, std=0.02) for i in range(16)]
    n = 16 if args.quick else 64
    texts = prompts(n)
    models = [f"bench/a{i % 16}" for i in range(n)]

    direct, prefill_s = engine_throughput(model_dir, paths, texts)

    def service_time(streams: int) -> float:
        """Time of one 32-token stream when `streams` share the server (alone: 32 inter-token gaps; loaded: its
        share of the measured HTTP throughput), over 0.9 so arrivals keep about 0.9 × `streams` busy (Little's
        law) without outrunning the server: a level above capacity would measure the queue, not the server."""
        return 32 * max(itl_alone, streams / http) / 0.9

    proc, base = start_server(model_dir, root, "--kv-cache-bytes", str(1 << 30))
    try:
        asyncio.run(http_throughput(base, models[:16], texts[:16]))  # warm-up: adapters resident
        http = max(asyncio.run(http_throughput(base, models, texts)) for _ in range(2))
        itl_alone = asyncio.run(poisson(base, models, texts, 1, 4, 2.0))["itl_p50_s"]
        levels = (1, 8) if args.quick else (1, 8, 32)  # requests per level: 6 per stream, at least 24 (p50 noise)
        latency = [
            asyncio.run(poisson(base, models, texts, s, 8 if args.quick else max(24, 6 * s), service_time(s)))
            for s in tqdm(levels, desc="latency levels")
        ]
    finally:
        proc.terminate()
        proc.wait(timeout=60)

    m = machine()
    at8 = next((r for r in latency if r["streams"] == 8), None)
    data = {
        "machine": m,
        "http_tok_s": http,
        "engine_direct_tok_s": direct,
        "http_vs_direct": http / direct,
        "prefill_alone_s": prefill_s,
        "latency": latency,
        "ttft_p50_at_8_vs_prefill": at8["ttft_p50_s"] / prefill_s if at8 else None,
    }
    rows = [
        f"| {r['streams']} | {r['requests']} | {r['ttft_p50_s'] * 1e3:.0f} / {r['ttft_p99_s'] * 1e3:.0f} | "
        f"{r['itl_p50_s'] * 1e3:.0f} / {r['itl_p99_s'] * 1e3:.0f} |"
        for r in latency
    ]
    table = "\n".join(
        [
            "# Serving over HTTP (SmolLM2, 16 rank-8 adapters, loopback, real `openai` client)",
            "",
            f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['device']}.",
            "",
            f"C: {n} concurrent streams × {NEW_TOKENS} tokens: HTTP {http:.0f} tok/s vs engine direct {direct:.0f} "
            f"tok/s = **{http / direct:.2f}×** (target ≥ 0.9×).",
            "",
            f"D: one prefill alone (first token of a lone request, in process): {prefill_s * 1e3:.0f} ms. "
            f"TTFT p50 at 8 streams = **{data['ttft_p50_at_8_vs_prefill']:.2f}×** that (target ≤ 2×)."
            if at8
            else "",
            "",
            "| streams (Poisson) | requests | TTFT p50 / p99 (ms) | inter-token p50 / p99 (ms) |",
            "|---|---|---|---|",
            *rows,
        ]
    )
    print(table)
    path = save("serving", data, table)
    print("wrote", path, plot_latency(latency, path.with_suffix(".png")))


def plot_latency(latency: list[dict], out: Path) -> Path:
    """TTFT and inter-token latency percentiles per load level, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    streams = [r["streams"] for r in latency]
    for ax, kind, title in [(axes[0], "ttft", "time to first token"), (axes[1], "itl", "inter-token latency")]:
        for q, style in (("p50", "o-"), ("p99", "x--")):
            ax.plot(streams, [r[f"{kind}_{q}_s"] * 1e3 for r in latency], style, label=q)
        ax.set_xscale("log", base=2)
        ax.set_xticks(streams, [str(s) for s in streams])
        ax.set_xlabel("concurrent streams (Poisson arrivals)")
        ax.set_ylabel("ms")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


if __name__ == "__main__":
    main()
