"""Serving over HTTP (issue 6, workloads C and D), side by side with the engine called directly.

C: 64 concurrent streaming completions × 64 tokens over 16 rank-8 adapters through the real `openai` client
   against a loopback `mux serve`, vs the same traffic submitted to an in-process engine. Target ≥ 0.9×.
   Repeated, interleaved (direct, HTTP per order, HTTP with a minimal SSE reader), the median of the per-round
   ratios reported. The minimal reader (asyncio sockets, one json.loads per event) beside the SDK splits the
   HTTP cost into the server's and the client's: the client runs on the same cores as the engine, and a core
   it takes stalls the engine's OpenMP team; the CPU seconds of client and server per run are reported.
   Levers beside them: the SDK against a server started with `--stream-interval 4` (the first token at once,
   then 4 per chunk: a quarter of the chunks for the client to parse); and against a server started with
   `--enforce-eager` (decode steps through transformers' forward). Tokens are counted from each response's
   `usage` (`stream_options.include_usage`), whatever the chunks hold.
D: Poisson arrivals keeping about 1, 8 and 32 streams busy (each level's rate: 0.9 × the requests per second that
   as many closed-loop clients complete; the streams in flight are measured and reported): time to first token
   and inter-token latency p50/p99, next to the time of one prefill forward of the same prompt alone. Target:
   TTFT p50 at 8 streams ≤ 2× that prefill. The prefill is a p50 too (of 10 lone requests back to back,
   measured before and after the HTTP runs, the smaller kept): a lone 30-token prefill forward ranged
   48-104 ms over 30 requests on this VM (ad hoc), and the best of five, the earlier denominator, compared a
   median with the machine's luckiest moment. The 8-stream level also runs on the in-process engine with the
   same arrivals: the TTFT without HTTP.
   Both scheduling orders side by side (policy `[scheduler] prefill_first_max_decodes`; 0 = mixed steps): one
   server each, the same arrivals on each in turn; the target is judged on the default order.

    python -m bench.serving [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import re
import statistics
import time
from pathlib import Path

from tqdm import tqdm

from bench.common import adapter_repository, harness, machine, percentile, prompts, save
from mux.config import SchedulerConfig
from mux.model.loader import default_model_dir

NEW_TOKENS = 64
STREAM_INTERVAL = 4  # the lever's server: tokens per chunk after the first
# each round sends the same prompts, and the in-process engine and the prefill baseline cache nothing: no prefix cache
SERVER_FLAGS = ("--kv-cache-bytes", str(1 << 30), "--no-enable-prefix-caching")


async def stream_one(client, model: str, prompt: str, max_tokens: int) -> tuple[float, list[float], int]:
    """(TTFT, gaps between text chunks, tokens generated: the response's usage) of one streamed completion."""
    t0 = time.perf_counter()
    times, tokens = [], 0
    stream = await client.completions.create(
        model=model,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            times.append(time.perf_counter())
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return (*figures(t0, times), tokens)


def figures(t0: float, times: list[float]) -> tuple[float, list[float]]:
    """(TTFT, inter-token gaps) from a request's start and the arrival times of its text events."""
    gaps = [b - a for a, b in itertools.pairwise(times)]
    return (times[0] - t0 if times else float("nan")), gaps


def openai_client(base: str):
    from openai import AsyncOpenAI

    return AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=600)


async def http_throughput(base: str, models: list[str], texts: list[str]) -> float:
    client = openai_client(base)
    t = time.perf_counter()
    results = await asyncio.gather(*(stream_one(client, m, p, NEW_TOKENS) for m, p in zip(models, texts, strict=True)))
    elapsed = time.perf_counter() - t
    await client.close()
    return sum(n for _, _, n in results) / elapsed


async def raw_stream_one(base: str, model: str, prompt: str, max_tokens: int) -> int:
    """Tokens of one streamed completion (its usage) read with the least client work: an HTTP/1.1 request with
    `Connection: close`, the head read once, the chunked framing (or, without it, the body up to close) undone
    by hand, events split on blank lines, one json.loads each."""
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    body = json.dumps(
        {
            "model": model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": True,
        }
    ).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    writer.write(head.encode() + body)
    response_head = await reader.readuntil(b"\r\n\r\n")
    chunked = b"transfer-encoding: chunked" in response_head.lower()
    buffer, tokens = b"", 0
    while True:
        if chunked:
            size = int((await reader.readuntil(b"\r\n"))[:-2].split(b";")[0], 16)
            chunk = (await reader.readexactly(size + 2))[:-2]  # the data and its CRLF
            if not size:
                break
        elif not (chunk := await reader.read(1 << 16)):
            break
        *events, buffer = (buffer + chunk).split(b"\n\n")
        for event in events:
            if event.startswith(b"data: {"):
                usage = json.loads(event[6:]).get("usage")
                tokens = usage["completion_tokens"] if usage else tokens
    writer.close()
    return tokens


async def raw_throughput(base: str, models: list[str], texts: list[str]) -> float:
    t = time.perf_counter()
    counts = await asyncio.gather(*(raw_stream_one(base, m, p, NEW_TOKENS) for m, p in zip(models, texts, strict=True)))
    return sum(counts) / (time.perf_counter() - t)


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measured(run, server_pid: int) -> dict:
    """run() -> tok/s, with the CPU seconds this (client) process and the server spent meanwhile."""
    client, server = time.process_time(), process_cpu_s(server_pid)
    tok_s = run()
    return {
        "tok_s": tok_s,
        "client_cpu_s": time.process_time() - client,
        "server_cpu_s": process_cpu_s(server_pid) - server,
    }


def in_process_engine(paths: list[Path], texts: list[str]):
    from mux.config import CacheConfig, EngineConfig
    from mux.engine.engine import Engine
    from mux.engine.sequence import SamplingParams

    engine = Engine(EngineConfig(cache=CacheConfig(kv_cache_bytes=1 << 30, prefix_caching=False)))
    engine.generate(texts[: len(paths)], SamplingParams(max_tokens=2, temperature=0), paths)  # adapters resident
    return engine


def engine_throughput(engine, paths: list[Path], texts: list[str]) -> float:
    """tok/s of the same traffic as C on the in-process engine."""
    from mux.engine.sequence import SamplingParams

    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    engine.start()
    t = time.perf_counter()
    streams = [engine.submit(p, params, paths[i % len(paths)]) for i, p in enumerate(texts)]
    tokens = sum(len(s.result().token_ids) for s in streams)
    engine.stop()
    return tokens / (time.perf_counter() - t)


def prefill_alone(engine, path: Path, text: str, n: int = 10) -> list[float]:
    """Seconds of each of `n` back-to-back requests alone in process, to the first token: one prefill forward
    (+ sampling) each."""
    from mux.engine.sequence import SamplingParams

    engine.start()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        next(iter(engine.submit(text, SamplingParams(max_tokens=1, temperature=0), path)))
        times.append(time.perf_counter() - t)
    engine.stop()
    return times


async def closed_loop(base: str, models: list[str], texts: list[str], streams: int, per_stream: int) -> float:
    """Requests per second with exactly `streams` clients, each sending its next request when the last ends:
    streams / mean response time (Little's law; total/elapsed would count the tail, when fewer are in flight)."""
    client = openai_client(base)
    times: list[float] = []

    async def one_client(c: int) -> None:
        for k in range(per_stream):
            i = c * per_stream + k
            t = time.perf_counter()
            await stream_one(client, models[i % len(models)], texts[i % len(texts)], 32)
            times.append(time.perf_counter() - t)

    await asyncio.gather(*(one_client(c) for c in range(streams)))
    await client.close()
    return streams / (sum(times) / len(times))


async def poisson(one, streams: int, n: int, rate: float) -> dict:
    """Poisson arrivals at `rate` requests/s, request i run by `one(i)` -> (TTFT, gaps, tokens); reports latency
    and the streams actually in flight on average (the requests' total time over the span from the first
    arrival to the last answer: Little's law)."""
    rnd = random.Random(streams)

    async def timed(i: int) -> tuple[float, float, tuple]:
        t = time.perf_counter()
        r = await one(i)
        return t, time.perf_counter(), r

    tasks = []
    for i in range(n):
        tasks.append(asyncio.create_task(timed(i)))
        await asyncio.sleep(rnd.expovariate(rate))
    done = await asyncio.gather(*tasks)
    results = [r for _, _, r in done]
    span = max(e for _, e, _ in done) - min(s for s, _, _ in done)
    ttft = [r[0] for r in results]
    gaps = [g for r in results for g in r[1]]
    return {
        "streams": streams,
        "requests": n,
        "rate_per_s": rate,
        "mean_in_flight": sum(e - s for s, e, _ in done) / span,
        "ttft_p50_s": percentile(ttft, 0.5),
        "ttft_p99_s": percentile(ttft, 0.99),
        "itl_p50_s": percentile(gaps, 0.5),
        "itl_p99_s": percentile(gaps, 0.99),
    }


async def http_poisson(base: str, models: list[str], texts: list[str], streams: int, n: int, rate: float) -> dict:
    client = openai_client(base)
    try:
        return await poisson(
            lambda i: stream_one(client, models[i % len(models)], texts[i % len(texts)], 32), streams, n, rate
        )
    finally:
        await client.close()


async def engine_stream_one(engine, path: Path, text: str, max_tokens: int) -> tuple[float, list[float], int]:
    """stream_one's figures for a request submitted to the in-process engine (the times of events with text, as
    SSE sends them; the tokens generated)."""
    from mux.engine.sequence import SamplingParams

    t0 = time.perf_counter()
    times, tokens = [], 0
    async for event in engine.submit(text, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True), path):
        if event.text:
            times.append(time.perf_counter())
        tokens += event.token_id is not None
    return (*figures(t0, times), tokens)


def engine_poisson(engine, paths: list[Path], texts: list[str], streams: int, n: int, rate: float) -> dict:
    """The same arrivals on the in-process engine: D without HTTP."""
    engine.start()
    try:
        return asyncio.run(
            poisson(
                lambda i: engine_stream_one(engine, paths[i % len(paths)], texts[i % len(texts)], 32), streams, n, rate
            )
        )
    finally:
        engine.stop()


DEFAULT_ORDER = "prefill_first" if SchedulerConfig().prefill_first_max_decodes else "mixed"
INTERVAL_RUN = f"openai {DEFAULT_ORDER}, stream interval {STREAM_INTERVAL}"  # the lever's row in C
EAGER_RUN = f"openai {DEFAULT_ORDER}, --enforce-eager"  # the other lever's row: transformers' forward for decodes


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
    start_server = harness().start_server
    model_dir = default_model_dir()
    root, paths = adapter_repository(model_dir, "mux-serving-")
    n = 16 if args.quick else 64
    texts = prompts(n)
    models = [f"bench/a{i % 16}" for i in range(n)]

    engine = in_process_engine(paths, texts)
    # measured before and after the HTTP runs, the faster median kept: a slow moment of this shared machine must
    # not inflate the denominator of D
    prefills = [prefill_alone(engine, paths[0], texts[0])]
    rounds = 1 if args.quick else 3

    # One server per scheduling order, both up at once (the idle one sleeps); every measurement runs on each in
    # turn, so the two orders are compared side by side.
    servers = {
        order: start_server(model_dir, root, *SERVER_FLAGS, "--policy", str(policy))
        for order, policy in write_policies(root.parent).items()
    }
    levers = {
        INTERVAL_RUN: start_server(model_dir, root, *SERVER_FLAGS, "--stream-interval", str(STREAM_INTERVAL)),
        EAGER_RUN: start_server(model_dir, root, *SERVER_FLAGS, "--enforce-eager"),
    }
    try:
        for _, base in [*servers.values(), *levers.values()]:
            asyncio.run(http_throughput(base, models[:16], texts[:16]))  # warm-up: adapters resident
        throughput = []  # one dict per round: direct, the SDK per order, the minimal reader on the default order
        default_proc, default_base = servers[DEFAULT_ORDER]
        for _ in tqdm(range(rounds), desc="C rounds"):
            r = {"direct": measured(lambda: engine_throughput(engine, paths, texts), default_proc.pid)}
            for order, (proc, base) in servers.items():
                r[f"openai {order}"] = measured(lambda b=base: asyncio.run(http_throughput(b, models, texts)), proc.pid)
            r["minimal reader"] = measured(
                lambda: asyncio.run(raw_throughput(default_base, models, texts)), default_proc.pid
            )
            for label, (proc, base) in levers.items():
                r[label] = measured(lambda b=base: asyncio.run(http_throughput(b, models, texts)), proc.pid)
            throughput.append(r)
        ratios = {
            k: statistics.median(r[k]["tok_s"] / r["direct"]["tok_s"] for r in throughput)
            for k in throughput[0]
            if k != "direct"
        }
        http_ratio = ratios[f"openai {DEFAULT_ORDER}"]
        levels = (1, 8) if args.quick else (1, 8, 32)  # requests per level: 6 per stream, at least 24 (p50 noise)
        latency, in_process = [], []
        for s in tqdm(levels, desc="latency levels"):
            # The arrival rate: 0.9 × what `s` closed-loop clients complete per second on the default order, so
            # about 0.9 × s streams are in flight (Little's law) without outrunning the server. (Estimating it
            # from one stream's speed overloaded the 8-stream level: 14-23 streams were in flight.)
            rate = 0.9 * asyncio.run(closed_loop(default_base, models, texts, s, 2 if args.quick else 3))
            # the target's level runs `rounds` times, the orders interleaved; its median TTFT p50 is judged
            # (and beside the servers, the in-process engine, default order: the same arrivals without HTTP)
            n_requests = 8 if args.quick else max(24, 6 * s)
            for k in range(rounds if s == 8 else 1):
                for order, (_, base) in servers.items():
                    r = asyncio.run(http_poisson(base, models, texts, s, n_requests, rate))
                    latency.append({"order": order, "round": k, **r})
                if s == 8:
                    r = engine_poisson(engine, paths, texts, s, n_requests, rate)
                    in_process.append({"order": DEFAULT_ORDER, "round": k, **r})
    finally:
        for proc, _ in [*servers.values(), *levers.values()]:
            proc.terminate()
            proc.wait(timeout=60)
    prefills.append(prefill_alone(engine, paths[0], texts[0]))
    prefill_s = min(statistics.median(p) for p in prefills)

    m = machine()
    at8 = {
        order: statistics.median(r["ttft_p50_s"] for r in latency if r["streams"] == 8 and r["order"] == order)
        / prefill_s
        for order in servers
    }
    in_process_at8 = statistics.median(r["ttft_p50_s"] for r in in_process) / prefill_s
    data = {
        "machine": m,
        "default_order": DEFAULT_ORDER,
        "rounds": rounds,
        "throughput_rounds": throughput,
        "http_vs_direct": http_ratio,
        "vs_direct_by_client": ratios,
        "prefill_alone_s": prefill_s,
        "prefill_alone_s_before_after": prefills,  # every lone request's seconds, before and after
        "latency": latency,
        "latency_in_process": in_process,
        "ttft_p50_at_8_vs_prefill_in_process": in_process_at8,
        "ttft_p50_at_8_vs_prefill": at8[DEFAULT_ORDER],
        "ttft_p50_at_8_vs_prefill_by_order": at8,
    }

    def per_round(k: str, field: str, fmt: str) -> str:
        return ", ".join(format(r[k][field], fmt) for r in throughput)

    c_rows = [
        f"| {k} | {per_round(k, 'tok_s', '.0f')} | {f'{ratios[k]:.2f}×' if k in ratios else '1'} "
        f"| {per_round(k, 'client_cpu_s', '.1f')} | {per_round(k, 'server_cpu_s', '.1f')} |"
        for k in throughput[0]
    ]
    rows = [
        f"| {r['streams']} | {order} | {r['requests']} | {r['rate_per_s']:.2f} | {r['mean_in_flight']:.1f} "
        f"| {r['ttft_p50_s'] * 1e3:.0f} / "
        f"{r['ttft_p99_s'] * 1e3:.0f} | {r['itl_p50_s'] * 1e3:.0f} / {r['itl_p99_s'] * 1e3:.0f} |"
        for r, order in [(r, r["order"]) for r in latency] + [(r, f"{r['order']}, in process") for r in in_process]
    ]
    orders = ", ".join(f"{o} {v:.2f}×" for o, v in at8.items())
    table = "\n".join(
        [
            "# Serving over HTTP (SmolLM2, 16 rank-8 adapters, loopback, real `openai` client)",
            "",
            f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['device']}.",
            "",
            f"C: {n} concurrent streams × {NEW_TOKENS} tokens, {rounds} interleaved round(s): HTTP with the `openai` "
            f"client = **{http_ratio:.2f}×** the engine direct (median of the rounds' ratios; target ≥ 0.9×; "
            f"scheduling order {DEFAULT_ORDER}); with the minimal SSE reader {ratios['minimal reader']:.2f}×; "
            f"the SDK against a server with `--stream-interval {STREAM_INTERVAL}` {ratios[INTERVAL_RUN]:.2f}×, "
            f"against one with `--enforce-eager` (decode steps through transformers' forward, not "
            f"mux/engine/cpu_decode.py) {ratios[EAGER_RUN]:.2f}×.",
            "",
            "| run | tok/s per round | vs direct (median) | client CPU s | server CPU s |",
            "|---|---|---|---|---|",
            *c_rows,
            "",
            "Client CPU: this process during the run (for direct: the engine's own threads too, as it runs here). "
            "Server CPU: the default-order server (the openai rows: that row's server).",
            "",
            f"D: one prefill alone (first token of a lone request, in process, p50 of {len(prefills[0])} back to back "
            f"before and after the HTTP runs: {statistics.median(prefills[0]) * 1e3:.0f} and "
            f"{statistics.median(prefills[1]) * 1e3:.0f} ms, the smaller kept; best "
            f"{min(min(p) for p in prefills) * 1e3:.0f} ms): {prefill_s * 1e3:.0f} ms. "
            f"TTFT p50 at 8 streams (median of {rounds} round(s)) = **{at8[DEFAULT_ORDER]:.2f}×** that with the "
            f"default order {DEFAULT_ORDER} (target ≤ 2×); by order: {orders}. The same arrivals on the "
            f"in-process engine (no HTTP, default order): {in_process_at8:.2f}×.",
            "",
            "| streams (Poisson) | order | requests | rate (req/s) | in flight (mean) | TTFT p50 / p99 (ms) "
            "| inter-token p50 / p99 (ms) |",
            "|---|---|---|---|---|---|---|",
            *rows,
        ]
    )
    print(table)
    path = save("serving-quick" if args.quick else "serving", data, table)  # a quick run never replaces a full one
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
            for q, style in (("p50", "o-"), ("p99", "x--")):
                key = f"{kind}_{q}_s"
                ys = [
                    statistics.median(r[key] for r in latency if r["order"] == order and r["streams"] == s) * 1e3
                    for s in streams
                ]  # a level run in several rounds: their median
                ax.plot(streams, ys, style, color=color, label=f"{order} {q}")
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
