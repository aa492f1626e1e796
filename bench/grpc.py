"""KServe v2 over gRPC vs HTTP SSE vs the engine direct (issue 44). Target: gRPC streaming ≥ 0.95× the engine.

Workload A's traffic: 64 concurrent requests × 64 new tokens (`ignore_eos`) over 16 rank-8 adapters, the same
prompts each way, run three ways per round on one loopback `mux serve --grpc-port` and the same machine's
in-process engine:
- `grpc`: Triton's own `tritonclient.grpc.aio`, one `ModelStreamInfer` stream per request (a response per piece
  of text, the last flagged `triton_final_response`), all 64 on one channel;
- `http`: KServe's `POST /v2/models/{model}/generate_stream` (SSE, one event per piece) through httpx;
- `direct`: the same requests submitted to an in-process engine (no server, no client).
The order of the three alternates by round (drift hits each); the median of the per-round ratios to `direct` is
reported, with the CPU seconds client and server spent per run (the client shares the engine's cores).

    python -m bench.grpc [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import httpx
import numpy as np

from bench.common import adapter_repository, harness, machine, prompts, save
from bench.serving import engine_throughput, in_process_engine, measured
from mux.model.loader import default_model_dir

ADAPTERS = 16
NEW_TOKENS = 64
PARAMS = {"max_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True}
# the in-process engine caches no prefixes (bench.serving's): neither does the server; the engine's default dtype
SERVER_FLAGS = ("--kv-cache-bytes", str(1 << 30), "--no-enable-prefix-caching", "--dtype", "auto")


def text_input(prompt: str):
    import tritonclient.grpc as triton

    tensor = triton.InferInput("text_input", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([prompt.encode()], dtype=np.object_))
    return tensor


async def grpc_stream_one(client, model: str, prompt: str) -> int:
    """Text pieces of one request on its own stream, read to the final response."""

    async def requests():
        yield {"model_name": model, "inputs": [text_input(prompt)], "parameters": PARAMS, "request_id": "0"}

    pieces, final = 0, False
    async for result, error in client.stream_infer(requests()):
        if error is not None:
            raise error
        response = result.get_response()
        pieces += len(response.outputs) > 0
        final = response.parameters["triton_final_response"].bool_param
    assert final, "the stream ended without its final response"
    return pieces


async def grpc_throughput(address: str, models: list[str], texts: list[str]) -> float:
    import tritonclient.grpc.aio as triton_aio

    async with triton_aio.InferenceServerClient(address) as client:
        t = time.perf_counter()
        await asyncio.gather(*(grpc_stream_one(client, m, p) for m, p in zip(models, texts, strict=True)))
        return len(texts) * NEW_TOKENS / (time.perf_counter() - t)


async def http_stream_one(client: httpx.AsyncClient, base: str, model: str, prompt: str) -> int:
    body = {"text_input": prompt, "parameters": PARAMS}
    events = 0
    async with client.stream("POST", f"{base}/v2/models/{model}/generate_stream", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            events += line.startswith("data: ")
    return events


async def http_throughput(base: str, models: list[str], texts: list[str]) -> float:
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=len(texts))) as client:
        t = time.perf_counter()
        await asyncio.gather(*(http_stream_one(client, base, m, p) for m, p in zip(models, texts, strict=True)))
        return len(texts) * NEW_TOKENS / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    servers = harness()
    model_dir = default_model_dir()
    root, paths = adapter_repository(model_dir, "mux-grpc-", ADAPTERS)
    n = 16 if args.quick else 64
    rounds = 1 if args.quick else 3
    texts = prompts(n)
    models = [f"bench/a{i % ADAPTERS}" for i in range(n)]
    engine = in_process_engine(paths, texts)
    grpc_port = servers.free_port()
    proc, base = servers.start_server(model_dir, root, *SERVER_FLAGS, "--grpc-port", str(grpc_port))
    address = f"127.0.0.1:{grpc_port}"
    runs = {
        "direct": lambda: engine_throughput(engine, paths, texts),
        "grpc": lambda: asyncio.run(grpc_throughput(address, models, texts)),
        "http": lambda: asyncio.run(http_throughput(base, models, texts)),
    }
    try:
        asyncio.run(grpc_throughput(address, models[:ADAPTERS], texts[:ADAPTERS]))  # warm-up: adapters resident
        asyncio.run(http_throughput(base, models[:ADAPTERS], texts[:ADAPTERS]))
        results: list[dict] = []
        for r in range(rounds):
            order = list(runs)[r % 3 :] + list(runs)[: r % 3]
            results.append({k: measured(runs[k], proc.pid) for k in order})
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    ratios = {k: statistics.median(x[k]["tok_s"] / x["direct"]["tok_s"] for x in results) for k in ("grpc", "http")}
    data = {
        "machine": machine(),
        "adapters": ADAPTERS,
        "requests": n,
        "new_tokens": NEW_TOKENS,
        "rounds": results,
        "vs_direct": ratios,
        "grpc_vs_http": statistics.median(x["grpc"]["tok_s"] / x["http"]["tok_s"] for x in results),
        "target": "grpc >= 0.95 x direct",
    }
    m = data["machine"]

    def per_round(k: str, field: str, fmt: str) -> str:
        return ", ".join(format(x[k][field], fmt) for x in results)

    rows = [
        f"| {k} | {per_round(k, 'tok_s', '.0f')} | {ratios.get(k, 1.0):.2f}× | {per_round(k, 'client_cpu_s', '.1f')} "
        f"| {per_round(k, 'server_cpu_s', '.1f')} |"
        for k in runs
    ]
    table = "\n".join(
        [
            f"# bench.grpc: KServe v2 over gRPC vs HTTP SSE vs the engine ({m['cpu']}, {m['cores']} cores, "
            f"torch {m['torch']}, {m['device']})",
            "",
            f"{n} concurrent requests × {NEW_TOKENS} tokens (`ignore_eos`) over {ADAPTERS} rank-8 adapters on the "
            f"embedded SmolLM2, {rounds} round(s), the order of the runs rotating. `grpc`: `tritonclient.grpc.aio`, "
            "one `ModelStreamInfer` stream a request; `http`: KServe `generate_stream` SSE through httpx; "
            "`direct`: the in-process engine.",
            "",
            "| run | tok/s per round | vs direct (median) | client CPU s | server CPU s |",
            "|---|---|---|---|---|",
            *rows,
            "",
            f"**gRPC streaming = {ratios['grpc']:.2f}× the engine direct** (target ≥ 0.95×); HTTP SSE "
            f"{ratios['http']:.2f}×; gRPC / HTTP {data['grpc_vs_http']:.2f}×. Client CPU: this process during the "
            "run (for direct: the engine's own threads, as it runs here).",
        ]
    )
    print(table)
    print(save("grpc", data, table))


if __name__ == "__main__":
    main()
