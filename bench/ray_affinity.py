"""Adapter-affinity routing vs routing by load alone, on Ray Serve (mux/ray/): two replicas of 4 device slots and
4 host-tier adapters each, 8 rank-8 adapters under Zipf traffic (α=1), the same trace through both in one run.
Per mode: device hit rate, disk and host loads per request, tokens/s, replicas' cold start; JSON + markdown in
bench/results/. `python -m bench.ray_affinity [--requests 160 --concurrency 8 --new-tokens 16]`."""

from __future__ import annotations

import argparse
import concurrent.futures
import random
import time
from pathlib import Path

import httpx

import mux
from bench.common import adapter_repository, harness, machine, prompts, save


def trace(n: int, population: int, seed: int) -> list[int]:
    weights = [1 / (i + 1) for i in range(population)]  # Zipf, α=1
    return random.Random(seed).choices(range(population), weights=weights, k=n)


def counters(base: str) -> dict:
    """Per-request figures summed over the replicas: device/host hits, disk misses, host→device loads."""
    s = httpx.get(f"{base}/admin/stats", timeout=30).json()
    c = s["totals"]["counters"]
    return {
        "device": c["hits"]["device"],
        "host": c["hits"]["host"],
        "disk": c["misses"],
        "host_to_device": c["loads"]["host_to_device"],
        "cold_start_s": [r["cold_start_s"] for r in s["replicas"].values()],
    }


def run_mode(args, base: str, repo: Path, affinity: bool, ids: list[int], texts: list[str]) -> dict:
    from ray import serve

    from mux import cli
    from mux.model.loader import default_model_dir
    from mux.ray import build

    model_dir = default_model_dir()
    flags = ["--model", str(model_dir), "--adapter-dir", str(repo), "--max-loras", "4", "--dtype", "float32"]
    flags += ["--replicas", "2", "--replica-cpus", "1", "--log-level", "warning", "--policy", str(args.policy)]
    serve.run(build(cli.parser().parse_args(["serve", *flags]), affinity=affinity), name="mux", route_prefix="/")
    body = {"max_tokens": args.new_tokens, "temperature": 0, "ignore_eos": True}

    def one(i: int) -> int:
        r = httpx.post(
            f"{base}/v1/completions", json={"model": f"bench/a{ids[i]}", "prompt": texts[i], **body}, timeout=300
        )
        r.raise_for_status()
        return r.json()["usage"]["completion_tokens"]

    try:
        with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
            list(pool.map(one, range(args.warmup)))  # every replica past its first loads
            time.sleep(1.0)  # one report period and the router's view of each replica's adapters
            before = counters(base)
            t = time.perf_counter()
            tokens = sum(pool.map(one, range(args.warmup, len(ids))))
            elapsed = time.perf_counter() - t
        time.sleep(1.0)
        after = counters(base)
    finally:
        serve.delete("mux")
    n = len(ids) - args.warmup
    got = {k: after[k] - before[k] for k in ("device", "host", "disk", "host_to_device")}
    acquired = got["device"] + got["host_to_device"]  # each request: its adapter in a slot, or copied into one
    return {
        "routing": "affinity" if affinity else "load only",
        "requests": n,
        "device_hit_rate": got["device"] / acquired if acquired else float("nan"),
        "disk_loads_per_request": got["disk"] / n,
        "host_to_device_loads_per_request": got["host_to_device"] / n,
        "tokens_per_s": tokens / elapsed,
        "seconds": elapsed,
        "cold_start_s": after["cold_start_s"],
    }


def from_zero(base: str, repo: Path, policy: Path) -> dict:
    """Scale to zero and back: with `--min-replicas 0` no replica runs until a request comes; that request's time
    to its first token is the cold start a caller sees (Ray's scale-up decision, process, model load, adapter)."""
    from ray import serve

    from mux import cli
    from mux.model.loader import default_model_dir
    from mux.ray import build

    flags = ["--model", str(default_model_dir()), "--adapter-dir", str(repo), "--policy", str(policy)]
    flags += ["--dtype", "float32", "--min-replicas", "0", "--max-replicas", "1", "--log-level", "warning"]
    serve.run(build(cli.parser().parse_args(["serve", *flags])), name="mux", route_prefix="/")
    body = {"model": "bench/a0", "prompt": "Hello", "max_tokens": 4, "stream": True}
    try:
        t = time.perf_counter()
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=300) as r:
            r.raise_for_status()
            next(line for line in r.iter_lines() if line.startswith("data: "))
            first_token = time.perf_counter() - t
        time.sleep(1.0)
        replica = next(iter(httpx.get(f"{base}/admin/stats", timeout=30).json()["replicas"].values()))
    finally:
        serve.delete("mux")
    return {"request_to_first_token_s": first_token, "replica_cold_start_s": replica["cold_start_s"]}


def table(results: list[dict], info: dict, args) -> str:
    lines = [
        "# Ray Serve: adapter-affinity routing vs routing by load alone",
        "",
        f"{info['cpu']} ({info['cores']} cores; flags {', '.join(info['cpu_flags']) or 'none of note'}), "
        f"torch {info['torch']}, SmolLM2-135M fp32; 2 replicas × 1 CPU on one machine, 4 slots + 4 host-tier "
        f"adapters each; 8 rank-8 adapters, Zipf α=1; {args.requests} requests ({args.warmup} warm-up), "
        f"{args.concurrency} at once, {args.new_tokens} new tokens each; a replica's room {args.room} requests "
        "(past it, Ray's router sends an adapter's requests to another replica too).",
        "",
        "| routing | device hit rate | disk loads / request | host→device loads / request | tok/s |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['routing']} | {r['device_hit_rate']:.2f} | {r['disk_loads_per_request']:.3f} | "
            f"{r['host_to_device_loads_per_request']:.3f} | {r['tokens_per_s']:.1f} |"
        )
    a, b = results
    lines += [
        "",
        f"Affinity / load only: device hit rate {a['device_hit_rate'] / max(b['device_hit_rate'], 1e-9):.2f}×, "
        f"throughput {a['tokens_per_s'] / b['tokens_per_s']:.2f}×.",
        "",
        "Replica cold start (process start → ready, → first response), seconds: "
        + "; ".join(f"{r['routing']}: {r['cold_start_s']}" for r in results),
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=160)
    ap.add_argument("--warmup", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    # a replica's room (its scheduler's max_num_seqs, Ray's max_ongoing_requests): past it, affinity yields to load
    ap.add_argument("--room", type=int, default=4)
    args = ap.parse_args()
    import ray
    from ray import serve

    from mux.model.loader import default_model_dir

    repo, _ = adapter_repository(default_model_dir(), "mux-ray-bench-", n=8)
    args.policy = repo.parent / "policy.toml"
    args.policy.write_text(f"[tiers]\nmax_cpu_loras = 4\n[scheduler]\nmax_num_seqs = {args.room}\n")
    ids, texts = trace(args.requests, 8, args.seed), prompts(args.requests, seed=args.seed)
    source = str(Path(mux.__file__).resolve().parent.parent)
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": source}})
    port = harness().free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        base = f"http://127.0.0.1:{port}"
        results = [run_mode(args, base, repo, affinity, ids, texts) for affinity in (True, False)]
        cold = from_zero(base, repo, args.policy)
    finally:
        ray.shutdown()
    info = machine()
    text = table(results, info, args)
    text += (
        f"\n\nFrom zero replicas (`--min-replicas 0 --max-replicas 1`): the first request's first token came "
        f"{cold['request_to_first_token_s']:.1f} s after it was sent; the replica's own cold start (process start "
        f"→ ready, → first response), seconds: {cold['replica_cold_start_s']}."
    )
    print(text)
    data = {"machine": info, "args": vars(args) | {"policy": None}, "results": results, "from_zero": cold}
    print(save("ray-affinity", data, text))


if __name__ == "__main__":
    main()
