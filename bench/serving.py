"""Serving over HTTP (issue 6, workloads C and D), side by side with the engine called directly.

C: 64 concurrent streaming completions × 64 tokens over 16 rank-8 adapters through the real `openai` client
   against a loopback `mux serve`, vs the same traffic submitted to an in-process engine. Target ≥ 0.9×.
D: Poisson arrivals keeping about 1, 8 and 32 streams busy (each level's rate set from the single-stream speed
   and the measured HTTP throughput, at 90% load): time to first token and inter-token latency p50/p99, next to
   the time of one prefill forward of the same prompt alone. Target: TTFT p50 at 8 streams ≤ 2× that prefill.
   Both scheduling orders side by side (policy `[scheduler] prefill_first_max_decodes`; 0 = mixed steps): one
   server each, the same arrivals on each in turn; the target is judged on the default order.

    python -m bench.serving [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import random
import re
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from bench.common import machine, percentile, prompts, save, write_random_adapter
from mux.config import SchedulerConfig
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


DEFAULT_ORDER = "prefill_first" if SchedulerConfig().prefill_first_max_decodes else "mixed"


def write_policies(directory: Path) -> dict[str, Path]:
    """The default policy file, once per scheduling order: {"mixed": path, "prefill_first": path}."""
    text = (Path(__file__).resolve().parent.parent / "policies" / "default.toml").read_text()
    out = {}
    limit = SchedulerConfig().prefill_first_max_decodes or 16
    for order, value in (("mixed", 0), ("prefill_first", limit)):
        path = directory / f"policy-{order}.toml"
        path.write_text(re.sub(r"(?m)^prefill_first_max_decodes = \d+", f"prefill_first_max_decodes = {value}", text))
        out[order] = path
    return out


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

    # One server per scheduling order, both up at once; every load level runs on each in turn with the same
    # arrival times, so the two orders are compared side by side.
    servers = {
        order: start_server(model_dir, root, "--kv-cache-bytes", str(1 << 30), "--policy", str(policy))
        for order, policy in write_policies(root.parent).items()
    }
    try:
        http_by_order = {}
        for order, (_, base) in servers.items():
            asyncio.run(http_throughput(base, models[:16], texts[:16]))  # warm-up: adapters resident
            http_by_order[order] = max(asyncio.run(http_throughput(base, models, texts)) for _ in range(2))
        http = http_by_order[DEFAULT_ORDER]
        itl_alone = asyncio.run(poisson(servers[DEFAULT_ORDER][1], models, texts, 1, 4, 2.0))["itl_p50_s"]
        levels = (1, 8) if args.quick else (1, 8, 32)  # requests per level: 6 per stream, at least 24 (p50 noise)
        latency = []
        for s in tqdm(levels, desc="latency levels"):
            for order, (_, base) in servers.items():
                r = asyncio.run(poisson(base, models, texts, s, 8 if args.quick else max(24, 6 * s), service_time(s)))
                latency.append({"order": order, **r})
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=60)

    m = machine()
    at8 = {r["order"]: r["ttft_p50_s"] / prefill_s for r in latency if r["streams"] == 8}
    data = {
        "machine": m,
        "default_order": DEFAULT_ORDER,
        "http_tok_s": http,
        "http_tok_s_by_order": http_by_order,
        "engine_direct_tok_s": direct,
        "http_vs_direct": http / direct,
        "prefill_alone_s": prefill_s,
        "latency": latency,
        "ttft_p50_at_8_vs_prefill": at8.get(DEFAULT_ORDER),
        "ttft_p50_at_8_vs_prefill_by_order": at8,
    }
    rows = [
        f"| {r['streams']} | {r['order']} | {r['requests']} | {r['ttft_p50_s'] * 1e3:.0f} / "
        f"{r['ttft_p99_s'] * 1e3:.0f} | {r['itl_p50_s'] * 1e3:.0f} / {r['itl_p99_s'] * 1e3:.0f} |"
        for r in latency
    ]
    orders = ", ".join(f"{o} {v:.2f}×" for o, v in at8.items())
    tputs = ", ".join(f"{o} {v:.0f} tok/s" for o, v in http_by_order.items())
    table = "\n".join(
        [
            "# Serving over HTTP (SmolLM2, 16 rank-8 adapters, loopback, real `openai` client)",
            "",
            f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['device']}.",
            "",
            f"C: {n} concurrent streams × {NEW_TOKENS} tokens: HTTP {http:.0f} tok/s vs engine direct {direct:.0f} "
            f"tok/s = **{http / direct:.2f}×** (target ≥ 0.9×; scheduling order {DEFAULT_ORDER}; by order: {tputs}).",
            "",
            f"D: one prefill alone (first token of a lone request, in process): {prefill_s * 1e3:.0f} ms. "
            f"TTFT p50 at 8 streams = **{at8[DEFAULT_ORDER]:.2f}×** that with the default order {DEFAULT_ORDER} "
            f"(target ≤ 2×); by order: {orders}."
            if at8
            else "",
            "",
            "| streams (Poisson) | order | requests | TTFT p50 / p99 (ms) | inter-token p50 / p99 (ms) |",
            "|---|---|---|---|---|",
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
    streams = sorted({r["streams"] for r in latency})
    for ax, kind, title in [(axes[0], "ttft", "time to first token"), (axes[1], "itl", "inter-token latency")]:
        for order, color in (("mixed", "tab:blue"), ("prefill_first", "tab:orange")):
            rows = [r for r in latency if r["order"] == order]
            for q, style in (("p50", "o-"), ("p99", "x--")):
                ax.plot(streams, [r[f"{kind}_{q}_s"] * 1e3 for r in rows], style, color=color, label=f"{order} {q}")
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
