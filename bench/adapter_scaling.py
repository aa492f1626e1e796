"""Adapter scaling on SmolLM2: throughput and TTFT as the number of distinct adapters in the traffic grows.

One process, one run: for populations of 1..1000 rank-8 adapters (Zipf α=1 and uniform traffic, 16 device
slots) it measures tokens/s and TTFT p50/p99; cold loads (disk→host, host→device) next to the raw cost of the
same bytes (safetensors read, memcpy); and each eviction policy's hit rates on the same traces.

The host tier starts each run empty by default (--host-tier cold: a 64-adapter host tier, so most tail requests
read their adapter from disk during the run). --host-tier warm is a server's steady state instead: the default
host budget (LoRAConfig: 2 GiB) filled, before each run, by an independent trace of the same traffic, so the
run's disk reads are only its adapters that the earlier traffic did not bring in. Before the first run, 64
adapters are read once and dropped: the process then holds the heap memory a host tier needs, as a server does
after its first minutes (fresh pages cost more than the reads on this VM).
Run: python -m bench.adapter_scaling [--requests 192 --new-tokens 8 --quick --host-tier warm]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import random
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load as safetensors_load
from tqdm import tqdm

from bench.common import RESULTS, machine, percentile, prompts, save, write_random_adapter
from mux.config import CacheConfig, EngineConfig, LoRAConfig, ModelConfig
from mux.engine.engine import Engine, freeze_heap
from mux.engine.sequence import SamplingParams
from mux.lora import adapter
from mux.lora.adapter import load_adapter
from mux.lora.layers import pages_for
from mux.lora.policies import POLICIES, make_policy
from mux.model.loader import default_model_dir
from mux.runtime import picks

POPULATIONS = (1, 8, 32, 128, 512, 1000)
SLOTS = 16
HOST_COUNT = 64


def trace(n_requests: int, population: int, dist: str, seed: int = 0) -> list[int]:
    rnd = random.Random(seed)
    if dist == "uniform":
        return [rnd.randrange(population) for _ in range(n_requests)]
    weights = [1 / (i + 1) for i in range(population)]  # Zipf, α = 1
    return rnd.choices(range(population), weights=weights, k=n_requests)


async def run_traffic(engine, texts, adapter_paths, new_tokens, concurrency) -> dict:
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    sem = asyncio.Semaphore(concurrency)
    ttft: list[float] = []
    loop = asyncio.get_running_loop()

    async def one(text, path):
        async with sem:
            t0 = time.perf_counter()  # a cold adapter's read is part of its request's time to first token
            ref = await loop.run_in_executor(None, engine.prepare_adapter, path) if path else None
            first = None
            async for ev in engine.submit(text, params, ref):
                if first is None and ev.token_id is not None:
                    first = time.perf_counter() - t0
            ttft.append(first)

    steps, sampled = engine.num_steps, engine.num_generated
    t = time.perf_counter()
    await asyncio.gather(*(one(x, p) for x, p in zip(texts, adapter_paths, strict=True)))
    elapsed = time.perf_counter() - t
    return {
        "tokens_per_s": len(texts) * new_tokens / elapsed,
        "seqs_per_step": (engine.num_generated - sampled) / max(1, engine.num_steps - steps),
        "ttft_p50_s": percentile(ttft, 0.5),
        "ttft_p99_s": percentile(ttft, 0.99),
        "seconds": elapsed,
    }


def pinned_batch_bound(population: int, dist: str, slots: int) -> int | None:
    """Mean sequences per step that `slots` pinned slots allow under this traffic, at most.

    A running sequence pins its adapter's slot, so a batch of N requests drawn from the traffic can run only if
    its N draws hit at most `slots` distinct adapters. In steady state the batch settles near the N whose
    expected number of distinct adapters equals `slots` (adapter i is in the batch with probability
    1 - (1 - p_i)^N), whatever the admission order; short of holding the tail back, no scheduler beats it.
    """
    if population <= slots:
        return None  # every adapter fits: no bound from the slots
    weights = [1 / (i + 1) if dist == "zipf" else 1.0 for i in range(population)]
    total = sum(weights)
    p = [w / total for w in weights]
    n = 1
    while sum(1 - (1 - pi) ** (n + 1) for pi in p) <= slots:
        n += 1
    return n


LEVERS = {  # --compare: the lever's two settings, (label, changes to the engine config) each
    "inline": (("inline", {"lora": {"inline_load_bytes": 64 << 20}}), ("loader", {"lora": {"inline_load_bytes": 0}})),
    "order": (
        ("prefill_first", {"scheduler": {"prefill_first_max_decodes": 16}}),
        ("mixed", {"scheduler": {"prefill_first_max_decodes": 0}}),
    ),
    "kernel": (("native", {"force": {"lora_kernel": "c"}}), ("torch", {"force": {"lora_kernel": "torch"}})),
    "reads": (
        ("between steps", {"lora": {"reads_between_steps": True}}),
        ("beside steps", {"lora": {"reads_between_steps": False}}),
    ),
}


def with_changes(config: EngineConfig, changes: dict) -> EngineConfig:
    """The config with the lever's changes ("force": internal choices, applied by `build`, not config)."""
    parts = {part: kv for part, kv in changes.items() if part != "force"}
    return replace(config, **{part: replace(getattr(config, part), **kv) for part, kv in parts.items()})


def build(config: EngineConfig, changes: dict, torch_thread) -> Engine:
    with contextlib.ExitStack() as stack:
        for op, value in changes.get("force", {}).items():
            stack.enter_context(picks.force(op, value))
        return Engine(with_changes(config, changes), torch_thread=torch_thread)


def reset_host(engine, earlier: list[Path]) -> None:
    """Empty the host tier, then read `earlier` into it in order (a warm tier: what that traffic left)."""
    engine.adapters.host.clear()
    for path in earlier:
        engine.prepare_adapter(path)


def compare(engines: dict, texts: list[str], traces: dict[int, list[Path]], earlier: dict, args) -> dict:
    """The same traces on two engines that differ in one lever, interleaved twice per population (one torch
    thread: one engine runs at a time). {population: {label: {metric: [run 1, run 2]}}}."""
    out = {}
    for pop, paths in traces.items():
        runs: dict[str, list[dict]] = {label: [] for label in engines}
        for _ in range(2):
            for label, engine in engines.items():
                reset_host(engine, earlier.get(pop, []))
                engine.start()
                runs[label].append(asyncio.run(run_traffic(engine, texts, paths, args.new_tokens, args.concurrency)))
                engine.stop()
                r = runs[label][-1]
                print(
                    f"{pop:5d} {label:14s} {r['tokens_per_s']:6.1f} tok/s TTFT p50 {r['ttft_p50_s']:.2f}s", flush=True
                )
        out[pop] = {
            label: {k: [r[k] for r in rs] for k in ("tokens_per_s", "ttft_p50_s", "ttft_p99_s")}
            for label, rs in runs.items()
        }
    return out


def simulate_hit_rates(ids: list[int], sizes: dict[int, int]) -> dict:
    """Replay one trace through a device tier (SLOTS) over a host tier (HOST_COUNT), unpinned, per policy."""
    out = {}
    for name in POLICIES:
        device, host = make_policy(name, "device"), make_policy(name, "host")
        in_device: set[int] = set()
        in_host: set[int] = set()
        hits = {"device": 0, "host": 0, "disk": 0}
        for i in ids:
            key = str(i)
            tier = "device" if i in in_device else "host" if i in in_host else "disk"
            hits[tier] += 1
            if tier != "device":
                if len(in_device) >= SLOTS:
                    in_device.discard(int(device.victim(str(k) for k in in_device)))
                in_device.add(i)
                if tier == "disk":
                    if len(in_host) >= HOST_COUNT:
                        in_host.discard(int(host.victim(str(k) for k in in_host)))
                    in_host.add(i)
            device.record_use(key, sizes[i])
            host.record_use(key, sizes[i])
        out[name] = {t: n / len(ids) for t, n in hits.items()}
    return out


def cold_loads(engine, paths: list[Path]) -> dict:
    """Per adapter: disk→host and host→device through the manager, next to a raw read and raw copies (each module
    in turn, and the adapter's whole buffer at once); disk→host also with its header planned anew (the reader's
    kept plans cleared first: the first adapter of a config); host→device also with torch's batched copy."""
    rows = []
    lora, manager = engine.lora, engine.adapters
    for key in list(manager.resident()):  # every page free: the raw copies below fill some of them
        manager.evict(key)
    for path in paths:
        t = time.perf_counter()
        weights = load_adapter(path, lora.shapes, engine.config.lora.max_lora_rank, lora.dtype)
        disk_to_host = time.perf_counter() - t
        adapter._plans.clear()
        t = time.perf_counter()
        load_adapter(path, lora.shapes, engine.config.lora.max_lora_rank, lora.dtype)
        disk_to_host_new_header = time.perf_counter() - t
        t = time.perf_counter()
        raw = safetensors_load((path / "adapter_model.safetensors").read_bytes())  # the library's own read
        raw_read = time.perf_counter() - t
        t = time.perf_counter()
        pages = tuple(range(pages_for(weights.rank)))
        lora.load(0, pages, weights)
        host_to_device = time.perf_counter() - t
        native, lora.native = lora.native, False
        t = time.perf_counter()
        lora.load(0, pages, weights)
        host_to_device_torch = time.perf_counter() - t
        lora.native = native
        whole = torch.empty_like(weights.buffer)
        t = time.perf_counter()
        whole.copy_(weights.buffer)
        memcpy_one = time.perf_counter() - t
        src = [a for a, _ in weights.modules.values()] + [b for _, b in weights.modules.values()]
        dst = [torch.empty_like(x) for x in src]
        t = time.perf_counter()
        for d, s in zip(dst, src, strict=True):
            d.copy_(s)
        memcpy = time.perf_counter() - t
        rows.append(
            {
                "bytes": weights.nbytes,
                "disk_to_host_s": disk_to_host,
                "disk_to_host_new_header_s": disk_to_host_new_header,
                "raw_read_s": raw_read,
                "host_to_device_s": host_to_device,
                "host_to_device_torch_s": host_to_device_torch,
                "memcpy_s": memcpy,
                "memcpy_one_s": memcpy_one,
            }
        )
        del raw
    med = {k: percentile([r[k] for r in rows], 0.5) for k in rows[0]}
    med["host_to_device_vs_memcpy"] = med["host_to_device_s"] / med["memcpy_s"]
    med["disk_to_host_vs_raw_read"] = med["disk_to_host_s"] / med["raw_read_s"]
    return med


def plot(results: dict, stem: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for dist, runs in results["traffic"].items():
        pops = [r["population"] for r in runs]
        ax1.plot(pops, [r["tokens_per_s"] for r in runs], marker="o", label=dist)
        ax2.plot(pops, [r["ttft_p50_s"] for r in runs], marker="o", label=f"{dist} p50")
        ax2.plot(pops, [r["ttft_p99_s"] for r in runs], marker="x", linestyle="--", label=f"{dist} p99")
    for ax, title, unit in [(ax1, "throughput", "tokens/s"), (ax2, "time to first token", "s")]:
        ax.set_xscale("log")
        ax.set_xlabel(f"distinct adapters in the traffic ({results['slots']} device slots)")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    files.append(RESULTS / f"{stem}-scaling.png")
    fig.savefig(files[-1], dpi=110)
    fig, ax = plt.subplots(figsize=(6, 4))
    c = results["cold_load"]
    labels = ["raw read", "disk→host", "memcpy", "host→device"]
    ax.bar(labels, [c["raw_read_s"] * 1e3, c["disk_to_host_s"] * 1e3, c["memcpy_s"] * 1e3, c["host_to_device_s"] * 1e3])
    ax.set_ylabel(f"ms per adapter ({c['bytes'] / 1e6:.1f} MB)")
    ax.set_title("cold load vs raw I/O")
    fig.tight_layout()
    files.append(RESULTS / f"{stem}-cold-load.png")
    fig.savefig(files[-1], dpi=110)
    return files


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=192)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=48)
    ap.add_argument("--quick", action="store_true", help="populations 1, 8, 128 only")
    ap.add_argument("--populations", default="", help="comma-separated, e.g. 8,1000 (default: all)")
    ap.add_argument("--dists", default="zipf,uniform")
    ap.add_argument("--repeats", type=int, default=1, help="runs per population, interleaved; the median is reported")
    ap.add_argument("--host-tier", choices=("cold", "warm"), default="cold", help="see the module docstring")
    ap.add_argument("--slots", type=int, default=SLOTS, help="max_loras: distinct adapters in one step")
    ap.add_argument("--ranks", default="8", help="adapter ranks, cycled over the adapters, e.g. 4,8,16,32,64")
    ap.add_argument("--max-lora-bytes", type=int, default=None, help="the device pool (default: the server's)")
    ap.add_argument(
        "--compare",
        choices=sorted(LEVERS),
        help="also run the Zipf traces on two engines side by side: host-tier hits copied by acquire vs by the "
        "loader thread (inline), prefill-first vs mixed steps (order), the C LoRA kernel vs torch's (kernel), or "
        "disk reads on the engine thread between steps vs on request threads beside them (reads)",
    )
    args = ap.parse_args()
    if args.compare and "zipf" not in args.dists.split(","):
        ap.error("--compare runs the Zipf traces: keep zipf in --dists")
    pops = (1, 8, 128) if args.quick else POPULATIONS
    if args.populations:
        pops = tuple(int(p) for p in args.populations.split(","))
    slots = args.slots
    model_dir = default_model_dir()
    root = Path(tempfile.mkdtemp(prefix="mux-scaling-"))
    texts = prompts(args.requests, seed=1)
    traces = {d: {p: trace(args.requests, p, d) for p in pops} for d in args.dists.split(",")}
    warm = args.host_tier == "warm"
    # the earlier traffic of a warm host tier: the same distribution, other draws
    earlier = {d: {p: trace(args.requests, p, d, seed=1) for p in pops} for d in traces} if warm else {}
    needed = sorted({i for t in (traces, earlier) for by_pop in t.values() for ids in by_pop.values() for i in ids})
    ranks = [int(r) for r in args.ranks.split(",")]
    print(f"writing {len(needed)} fp16 adapters of ranks {args.ranks} ...", flush=True)
    paths = {
        i: write_random_adapter(
            model_dir, root / f"a{i:04d}", r=ranks[i % len(ranks)], seed=i, std=0.02, dtype=torch.float16
        )
        for i in needed
    }
    config = EngineConfig(
        model=ModelConfig(model=str(model_dir)),
        lora=LoRAConfig(
            max_loras=slots,
            max_lora_rank=max(ranks),
            max_lora_bytes=args.max_lora_bytes,
            **({} if warm else {"max_cpu_loras": HOST_COUNT}),
        ),
        cache=CacheConfig(kv_cache_bytes=1 << 30, prefix_caching=False),
    )
    engine = Engine(config)
    freeze_heap()  # as the server does (mux serve)
    engine.start()
    asyncio.run(run_traffic(engine, texts[:8], [None] * 8, 2, 8))  # warm-up
    # ... and a full host tier read once and dropped: the process then holds the heap memory a host tier needs, as
    # a server does after its first minutes. A process's first reads fault in fresh pages, which on this VM cost
    # more than the reads (first-round reads 32 ms median against 12 ms after, instrumented run, 2026-12-02).
    reset_host(engine, [paths[i] for i in needed[:HOST_COUNT]])
    engine.adapters.host.clear()
    results: dict = {
        "machine": machine(),
        "workload": vars(args),
        "slots": slots,
        "host_tier": args.host_tier,
        "host_count": config.lora.max_cpu_loras,
        "host_bytes": config.lora.max_cpu_adapter_bytes,
        "traffic": {},
        "hit_rates": {},
    }
    bar = tqdm(total=sum(len(by_pop) for by_pop in traces.values()) * args.repeats, desc="traffic runs")
    for dist, by_pop in traces.items():
        runs: dict[int, list[dict]] = {pop: [] for pop in by_pop}
        for _ in range(args.repeats):  # the populations interleaved: a slow spell of the machine hits all of them
            for pop, ids in by_pop.items():
                reset_host(engine, [paths[i] for i in earlier.get(dist, {}).get(pop, [])])
                reads = engine.adapters.counters["loads"]["disk_to_host"]
                r = asyncio.run(run_traffic(engine, texts, [paths[i] for i in ids], args.new_tokens, args.concurrency))
                r.update(
                    population=pop,
                    distinct=len(set(ids)),
                    counters=engine.adapters.stats()["counters"],
                    disk_reads=engine.adapters.counters["loads"]["disk_to_host"] - reads,
                    seqs_per_step_bound=pinned_batch_bound(pop, dist, slots),
                )
                runs[pop].append(r)
                bar.write(
                    f"{dist:8s} adapters={pop:5d} distinct={r['distinct']:4d} {r['tokens_per_s']:7.1f} tok/s "
                    f"TTFT p50 {r['ttft_p50_s']:.2f}s p99 {r['ttft_p99_s']:.2f}s, "
                    f"{r['seqs_per_step']:.1f} seqs/step (pinned-slot bound {r['seqs_per_step_bound'] or '-'}), "
                    f"{r['disk_reads']} disk reads"
                )
                bar.update()
        results["traffic"][dist] = []
        for pop, rs in runs.items():  # each population's median run by tokens/s, with every run's tokens/s
            median = sorted(rs, key=lambda r: r["tokens_per_s"])[(len(rs) - 1) // 2]
            results["traffic"][dist].append({**median, "tokens_per_s_runs": [r["tokens_per_s"] for r in rs]})
            results["hit_rates"].setdefault(dist, {})[pop] = simulate_hit_rates(
                by_pop[pop], dict.fromkeys(by_pop[pop], 1)
            )
    bar.close()
    engine.stop()
    t = time.perf_counter()  # one full pass of the cyclic collector with the host tier the last run left
    gc.collect()
    results["gc_full_pass"] = {"seconds": time.perf_counter() - t, "host_adapters": len(engine.adapters.host)}
    if args.compare:
        engines = {label: build(config, changes, engine.torch) for label, changes in LEVERS[args.compare]}
        zipf_paths = {pop: [paths[i] for i in ids] for pop, ids in traces["zipf"].items()}
        earlier_paths = {pop: [paths[i] for i in ids] for pop, ids in earlier.get("zipf", {}).items()}
        runs = compare(engines, texts, zipf_paths, earlier_paths, args)
        results["compare"] = {"lever": args.compare, "runs": runs}
    # on the engine's torch thread (the loop has stopped): one OpenMP team, as for the engine's own loads
    results["cold_load"] = engine.torch.call(cold_loads, engine, [paths[i] for i in needed[:16]])
    print("cold load (median):", json.dumps(results["cold_load"]), flush=True)
    zipf = {r["population"]: r["tokens_per_s_runs"] for r in results["traffic"].get("zipf", [])}
    if 8 in zipf and 1000 in zipf:  # per round (the two runs closest in time), then the median round
        rounds = [a / b for a, b in zip(zipf[1000], zipf[8], strict=True)]
        results["zipf_1000_vs_8_rounds"] = rounds
        results["zipf_1000_vs_8"] = sorted(rounds)[(len(rounds) - 1) // 2]
    lines = [
        f"# Adapter scaling ({args.requests} requests × {args.new_tokens} tokens, {args.concurrency} concurrent, "
        f"{slots} slots, {args.host_tier} host tier, median of {args.repeats} interleaved run(s))",
        "",
        f"Machine: {json.dumps(results['machine'])}",
        "",
        "| traffic | adapters | distinct | tok/s | TTFT p50 s | TTFT p99 s | seqs/step | pinned-slot bound "
        "| disk reads | tok/s of each run |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for dist, runs in results["traffic"].items():
        lines += [
            f"| {dist} | {r['population']} | {r['distinct']} | {r['tokens_per_s']:.1f} | "
            f"{r['ttft_p50_s']:.2f} | {r['ttft_p99_s']:.2f} | {r['seqs_per_step']:.1f} | "
            f"{r['seqs_per_step_bound'] or '-'} | {r['disk_reads']} | "
            f"{', '.join(f'{v:.1f}' for v in r['tokens_per_s_runs'])} |"
            for r in runs
        ]
    lines += [
        "",
        "seqs/step: sequences sampled per engine step. Pinned-slot bound: the batch at which the traffic's draws "
        f"are expected to hit {slots} distinct adapters (`pinned_batch_bound`); no admission order runs more in "
        "steady state while every running sequence pins its slot (-: every adapter fits). Disk reads: adapters "
        "read from disk during the run (host-tier misses).",
    ]
    c = results["cold_load"]
    lines += [
        "",
        f"Cold load per adapter ({c['bytes'] / 1e6:.1f} MB): disk→host {c['disk_to_host_s'] * 1e3:.1f} ms "
        f"(raw safetensors read {c['raw_read_s'] * 1e3:.1f} ms, {c['disk_to_host_vs_raw_read']:.2f}×; "
        f"with the header planned anew {c.get('disk_to_host_new_header_s', float('nan')) * 1e3:.1f} ms), "
        f"host→device {c['host_to_device_s'] * 1e3:.2f} ms (memcpy {c['memcpy_s'] * 1e3:.2f} ms, "
        f"{c['host_to_device_vs_memcpy']:.2f}×; the buffer in one copy {c['memcpy_one_s'] * 1e3:.2f} ms; "
        f"with torch's batched copy instead of the C copy {c['host_to_device_torch_s'] * 1e3:.2f} ms)",
        "",
        f"One full collection of the cyclic GC with {results['gc_full_pass']['host_adapters']} adapters in the host "
        f"tier: {results['gc_full_pass']['seconds'] * 1e3:.1f} ms",
        "",
        "Hit rates (device/host/disk) per policy on the same traces:",
        "",
    ]
    for dist, by_pop in results["hit_rates"].items():
        for pop, rates in by_pop.items():
            cells = ", ".join(f"{p}: {r['device']:.2f}/{r['host']:.2f}/{r['disk']:.2f}" for p, r in rates.items())
            lines.append(f"- {dist}, {pop} adapters: {cells}")
    if "zipf_1000_vs_8" in results:
        rounds = ", ".join(f"{v:.2f}" for v in results["zipf_1000_vs_8_rounds"])
        ratio = results["zipf_1000_vs_8"]
        lines += ["", f"Throughput at 1000 Zipf adapters vs 8: {ratio:.2f}× (median round; rounds {rounds})"]
    if "compare" in results:
        c = results["compare"]
        lines += [
            "",
            f"Lever `{c['lever']}` side by side (Zipf traces, two interleaved runs each):",
            "",
            "| adapters | setting | tok/s | TTFT p50 s | TTFT p99 s |",
            "|---|---|---|---|---|",
            *(
                f"| {pop} | {label} | {', '.join(f'{v:.1f}' for v in r['tokens_per_s'])} | "
                f"{', '.join(f'{v:.2f}' for v in r['ttft_p50_s'])} | {', '.join(f'{v:.2f}' for v in r['ttft_p99_s'])} |"
                for pop, by_label in c["runs"].items()
                for label, r in by_label.items()
            ),
        ]
    partial = args.populations or args.dists != "zipf,uniform" or slots != SLOTS
    name = f"adapter-scaling-{slots}-slots-{'-'.join(map(str, pops))}" if partial else "adapter-scaling"
    if args.concurrency != 48:
        name += f"-{args.concurrency}-concurrent"
    if warm:
        name += "-warm-host"
    if args.repeats > 1:
        name += f"-{args.repeats}-runs"
    path = save(name, results, "\n".join(lines))
    print("wrote", path, *plot(results, path.stem))


if __name__ == "__main__":
    main()
