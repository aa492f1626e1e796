"""Batch jobs beside online traffic (issue 39), on one loopback `mux serve` (the embedded model, 16 rank-8 adapters).

Priority: Poisson arrivals keeping about 8 streams busy (the rate: 0.9 × the requests per second 8 closed-loop
clients complete) of streamed completions of 32 tokens; their time to first token with no batch, and while a
2,000-line batch (completions of 32 tokens over the same adapters) runs. Rounds alternate the two arms; the
median per-round ratio of TTFT p50 is reported. Target ≤ 1.3×.
Idle throughput: the same N requests (64 tokens each) as one batch on an idle server, created to completed,
against 64 concurrent online clients sending them (non-streamed), in alternating rounds; tokens per second from
each response's usage. Target: the batch ≥ 0.9× the online clients.

    python -m bench.batch [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import httpx

from bench.common import adapter_repository, harness, machine, prompts, save
from bench.serving import SERVER_FLAGS, closed_loop, http_poisson
from mux.model.loader import default_model_dir

ADAPTERS = 16
BATCH_LINES = 2000
ONLINE_TOKENS = 32  # bench.serving's Poisson requests: completions of 32 tokens
THROUGHPUT_TOKENS = 64
CLIENTS = 64


def batch_lines(models: list[str], texts: list[str], n: int, max_tokens: int, tag: str) -> bytes:
    body = {"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    lines = [
        {
            "custom_id": f"{tag}-{i}",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": models[i % len(models)], "prompt": texts[i % len(texts)], **body},
        }
        for i in range(n)
    ]
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


# One client for every poll: a new httpx client per call costs ~30 ms of CPU (its SSL context), on the cores the
# server runs on; polling with one every 50 ms once halved the batch's throughput.
HTTP = httpx.Client(timeout=60)
POLL_S = 0.25


def start_batch(base: str, data: bytes) -> str:
    upload = HTTP.post(f"{base}/v1/files", files={"file": ("in.jsonl", data)}, data={"purpose": "batch"})
    upload.raise_for_status()
    body = {"input_file_id": upload.json()["id"], "endpoint": "/v1/completions", "completion_window": "24h"}
    created = HTTP.post(f"{base}/v1/batches", json=body)
    created.raise_for_status()
    return created.json()["id"]


def batch_state(base: str, batch_id: str) -> dict:
    return HTTP.get(f"{base}/v1/batches/{batch_id}").json()


def wait_running(base: str, batch_id: str) -> None:
    """Until the batch has finished its first lines: it is in the engine, at its steady share."""
    while batch_state(base, batch_id)["request_counts"]["completed"] < 8:
        time.sleep(POLL_S)


def cancel(base: str, batch_id: str) -> dict:
    HTTP.post(f"{base}/v1/batches/{batch_id}/cancel").raise_for_status()
    while (state := batch_state(base, batch_id))["status"] == "cancelling":
        time.sleep(POLL_S)
    return state


def batch_throughput(base: str, data: bytes) -> dict:
    """Tokens per second of one batch on an idle server: from its creation to its completion (to POLL_S)."""
    t = time.perf_counter()
    batch_id = start_batch(base, data)
    while (state := batch_state(base, batch_id))["status"] not in ("completed", "failed", "cancelled", "expired"):
        time.sleep(POLL_S)
    elapsed = time.perf_counter() - t
    assert state["status"] == "completed" and state["request_counts"]["failed"] == 0, state
    content = HTTP.get(f"{base}/v1/files/{state['output_file_id']}/content").content
    tokens = sum(json.loads(r)["response"]["body"]["usage"]["completion_tokens"] for r in content.splitlines())
    return {"tok_s": tokens / elapsed, "tokens": tokens, "seconds": elapsed}


async def online_throughput(base: str, data: bytes, clients: int) -> dict:
    """The batch's requests sent online by `clients` concurrent clients, non-streamed, each taking the next."""
    bodies = [json.loads(line)["body"] for line in data.splitlines()]
    queue = list(reversed(bodies))
    tokens = 0

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal tokens
        while queue:
            r = await client.post(f"{base}/v1/completions", json=queue.pop())
            r.raise_for_status()
            tokens += r.json()["usage"]["completion_tokens"]

    t = time.perf_counter()
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients)) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
    elapsed = time.perf_counter() - t
    return {"tok_s": tokens / elapsed, "tokens": tokens, "seconds": elapsed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    model_dir = default_model_dir()
    root, _ = adapter_repository(model_dir, "mux-batch-bench-", ADAPTERS)
    proc, base = harness().start_server(model_dir, root, *SERVER_FLAGS, "--dtype", "auto")
    models = [f"bench/a{i}" for i in range(ADAPTERS)]
    texts = prompts(64)
    rounds = 2 if args.quick else 3
    requests = 48 if args.quick else 96
    n_throughput = 256 if args.quick else 384
    try:
        asyncio.run(closed_loop(base, models, texts, 16, 2))  # warm-up: every adapter read once
        asyncio.run(closed_loop(base, models, texts, 8, 2))
        rate = 0.9 * asyncio.run(closed_loop(base, models, texts, 8, 4))
        priority = {"alone": [], "with_batch": []}
        batch_progress = []
        for r in range(rounds):
            for arm in ("alone", "with_batch")[:: 1 if r % 2 == 0 else -1]:
                batch_id = None
                if arm == "with_batch":
                    batch_id = start_batch(base, batch_lines(models, texts, BATCH_LINES, ONLINE_TOKENS, f"p{r}"))
                    wait_running(base, batch_id)
                    before = batch_state(base, batch_id)["request_counts"]["completed"]
                    t = time.perf_counter()
                priority[arm].append(asyncio.run(http_poisson(base, models, texts, 8, requests, rate)))
                if batch_id:
                    lines = batch_state(base, batch_id)["request_counts"]["completed"] - before
                    batch_progress.append({"lines_per_s": lines / (time.perf_counter() - t)})
                    assert cancel(base, batch_id)["status"] == "cancelled"
        data = batch_lines(models, texts, n_throughput, THROUGHPUT_TOKENS, "t")
        idle = {"batch": [], "online": []}
        for r in range(rounds):
            for arm in ("online", "batch")[:: 1 if r % 2 == 0 else -1]:
                if arm == "batch":
                    idle[arm].append(batch_throughput(base, data))
                else:
                    idle[arm].append(asyncio.run(online_throughput(base, data, CLIENTS)))
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    ttft = [b["ttft_p50_s"] / a["ttft_p50_s"] for a, b in zip(priority["alone"], priority["with_batch"], strict=True)]
    speed = [b["tok_s"] / o["tok_s"] for o, b in zip(idle["online"], idle["batch"], strict=True)]
    result = {
        "machine": machine(),
        "adapters": ADAPTERS,
        "rate_per_s": rate,
        "poisson_requests": requests,
        "batch_lines": BATCH_LINES,
        "priority": priority,
        "batch_progress_under_online": batch_progress,
        "ttft_p50_ratios": ttft,
        "ttft_p50_ratio_median": statistics.median(ttft),
        "throughput_requests": n_throughput,
        "idle": idle,
        "throughput_ratios": speed,
        "throughput_ratio_median": statistics.median(speed),
        "target": "ttft_p50_ratio_median <= 1.3, throughput_ratio_median >= 0.9",
    }
    m = result["machine"]

    def cells(runs: list[dict], key: str, fmt: str, scale: float = 1.0) -> str:
        return " / ".join(format(x[key] * scale, fmt) for x in runs)

    p_rows = [
        f"| {arm} | {cells(x, 'ttft_p50_s', '.0f', 1e3)} | {cells(x, 'ttft_p99_s', '.0f', 1e3)} | "
        f"{cells(x, 'mean_in_flight', '.1f')} |"
        for arm, x in priority.items()
    ]
    t_rows = [f"| {arm} | {cells(x, 'tok_s', '.0f')} | {cells(x, 'seconds', '.1f')} |" for arm, x in idle.items()]
    progress = " / ".join(f"{x['lines_per_s']:.1f}" for x in batch_progress)
    table = "\n".join(
        [
            f"# bench.batch: batch jobs beside online traffic ({m['cpu']}, {m['cores']} cores, flags {m['cpu_flags']})",
            "",
            f"{ADAPTERS} rank-8 adapters on the embedded SmolLM2. Priority: Poisson arrivals at {rate:.2f} requests/s "
            f"(0.9 × 8 closed-loop clients), {requests} streamed completions of {ONLINE_TOKENS} tokens a round, "
            f"alone and while a {BATCH_LINES}-line batch runs (its lines: {ONLINE_TOKENS} tokens).",
            "",
            "| online traffic | TTFT p50 ms per round | TTFT p99 ms | streams in flight |",
            "|---|---|---|---|",
            *p_rows,
            "",
            f"The batch meanwhile finished {progress} lines/s. **TTFT p50 with the batch: "
            f"{statistics.median(ttft):.2f}×** the same traffic alone (target ≤ 1.3).",
            "",
            f"Idle server: {n_throughput} completions of {THROUGHPUT_TOKENS} tokens as one batch vs {CLIENTS} "
            "concurrent online clients (non-streamed).",
            "",
            "| sent as | tok/s per round | seconds |",
            "|---|---|---|",
            *t_rows,
            "",
            f"**The batch alone: {statistics.median(speed):.3f}×** the online clients' throughput (target ≥ 0.9).",
        ]
    )
    print(table)
    print(save("batch", result, table))


if __name__ == "__main__":
    main()
