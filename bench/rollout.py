"""Rollouts under load (issue 38): what a 1% canary costs. Target: throughput with two versions of an adapter live
(a 99/1 split, sticky `user`s) ≥ 0.97× the same traffic on one version.

One loopback `mux serve` on the embedded model holds three sets of 16 rank-8 adapters with the same shapes:
`one/a<i>` with one version each; `canary_on_one/a<i>`, where a0 has a second version (uploaded with
activate=false) at 1%; `canary_on_all/a<i>`, where every adapter has. 64 closed-loop clients (streamed
completions of 64 tokens, `ignore_eos`, a distinct `user` per request; tokens counted as they arrive) run a
window on each set in turn, the order alternating by round; the median per-round ratio to `one` is reported
with the share the canaries served.

    python -m bench.rollout [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from bench.common import harness, machine, prompts, save, write_random_adapter
from mux.model.loader import default_model_dir

ADAPTERS = 16
NEW_TOKENS = 64
FILES = ("adapter_config.json", "adapter_model.safetensors")


async def window(base: str, models: list[str], texts: list[str], seconds: float, tag: str) -> dict:
    """Closed loop: one client per entry of `models` streams completions back to back for `seconds`; the tokens
    that arrived inside the window, per second (one SSE event a token: the server's default stream interval)."""
    deadline = time.perf_counter() + seconds
    counts = {"tokens": 0, "requests": 0, "canary_requests": 0}

    async def client_loop(client: httpx.AsyncClient, i: int, model: str, text: str) -> None:
        for k in itertools.count():
            body = {"model": model, "prompt": text, "max_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True}
            body = {**body, "stream": True, "user": f"{tag}-c{i}-{k}"}
            async with client.stream("POST", f"{base}/v1/completions", json=body) as r:
                r.raise_for_status()
                counts["requests"] += 1
                counts["canary_requests"] += r.headers["x-mux-adapter-version"] == "2"
                async for line in r.aiter_lines():
                    if time.perf_counter() > deadline:
                        return
                    counts["tokens"] += line.startswith("data: {") and '"choices":[]' not in line

    limits = httpx.Limits(max_connections=len(models))
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await asyncio.gather(
            *(client_loop(client, i, m, p) for i, (m, p) in enumerate(zip(models, texts, strict=True)))
        )
    return {"tok_s": counts["tokens"] / seconds, **{k: counts[k] for k in ("requests", "canary_requests")}}


def upload(base: str, name: str, src: Path, activate: bool) -> None:
    files = {f: (f, (src / f).read_bytes()) for f in FILES}
    fields = {"name": (None, name), "activate": (None, "true" if activate else "false")}
    httpx.post(f"{base}/v1/adapters", files={**fields, **files}, timeout=60).raise_for_status()


ARMS = {  # arm -> the adapters (of ADAPTERS) that carry a 99/1 split
    "one": (),
    "canary_on_one": (0,),
    "canary_on_all": tuple(range(ADAPTERS)),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    model_dir = default_model_dir()
    work = Path(tempfile.mkdtemp(prefix="mux-rollout-"))
    src = work / "src"
    sources = [write_random_adapter(model_dir, src / f"a{i}", r=8, seed=i, std=0.02) for i in range(ADAPTERS)]
    canaries = [write_random_adapter(model_dir, src / f"c{i}", r=8, seed=100 + i, std=0.02) for i in range(ADAPTERS)]
    proc, base = harness().start_server(model_dir, work / "repo", "--kv-cache-bytes", str(1 << 30), "--dtype", "auto")
    seconds = 8.0 if args.quick else 20.0
    n = 16 if args.quick else 64
    texts = prompts(n)
    try:
        for arm, split in ARMS.items():
            for i in range(ADAPTERS):
                upload(base, f"{arm}/a{i}", sources[i], True)
                if i in split:
                    upload(base, f"{arm}/a{i}", canaries[i], False)
                    body = {"weights": {"1": 99, "2": 1}}
                    httpx.put(f"{base}/v1/adapters/{arm}/a{i}/traffic", json=body, timeout=30).raise_for_status()
        sets = {arm: [f"{arm}/a{i % ADAPTERS}" for i in range(n)] for arm in ARMS}
        for arm in ARMS:  # warm-up: every adapter read once
            asyncio.run(window(base, sets[arm], texts, 5.0, f"warm-{arm}"))
        rounds = {arm: [] for arm in ARMS}
        for r in range(2 if args.quick else 3):
            for arm in list(ARMS)[:: 1 if r % 2 == 0 else -1]:  # the order alternates: drift hits every arm
                rounds[arm].append(asyncio.run(window(base, sets[arm], texts, seconds, f"{arm}-{r}")))
        slots = httpx.get(f"{base}/admin/stats", timeout=30).json()["tiers"]["device"]
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    ratios = {arm: [x["tok_s"] / o["tok_s"] for o, x in zip(rounds["one"], rounds[arm], strict=True)] for arm in ARMS}
    median = {arm: statistics.median(v) for arm, v in ratios.items()}
    share = {
        arm: sum(x["canary_requests"] for x in rounds[arm]) / sum(x["requests"] for x in rounds[arm]) for arm in ARMS
    }
    data = {
        "machine": machine(),
        "adapters": ADAPTERS,
        "clients": n,
        "window_s": seconds,
        "new_tokens": NEW_TOKENS,
        "arms": {arm: list(split) for arm, split in ARMS.items()},
        "rounds": rounds,
        "ratios": ratios,
        "ratio_median": median,
        "canary_share": share,
        "device_slots": slots,
        "target": "canary_on_one >= 0.97",
    }
    m = data["machine"]
    rows = [
        f"| {arm} | {' / '.join(str(round(x['tok_s'])) for x in rounds[arm])} | {share[arm]:.3f} | {median[arm]:.3f} |"
        for arm in ARMS
    ]
    table = "\n".join(
        [
            f"# bench.rollout: 99/1 splits vs one version ({m['cpu']}, {m['cores']} cores, flags {m['cpu_flags']})",
            "",
            f"{ADAPTERS} rank-8 adapters, {n} closed-loop clients over HTTP for {seconds:g} s a round, completions of "
            f"{NEW_TOKENS} tokens, a distinct `user` each; {slots['capacity']} device slots. `canary_on_one`: "
            "one adapter has a second version at 1%; `canary_on_all`: every adapter has.",
            "",
            "| arm | tok/s per round | canary share | median ratio to `one` |",
            "|---|---|---|---|",
            *rows,
            "",
            f"**canary on one adapter: {median['canary_on_one']:.3f}x** (target ≥ 0.97); "
            f"on all {ADAPTERS}: {median['canary_on_all']:.3f}x",
        ]
    )
    print(table)
    print(save("rollout", data, table))


if __name__ == "__main__":
    main()
