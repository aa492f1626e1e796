"""Throughput side by side, one process, one run: HF generate (base), PEFT (mixed batch; set_adapter per request), mux.

Workload (issue 2): 64 prompts of ≈30 tokens, 64 new greedy tokens, 16 distinct rank-8 adapters on all seven
targets, SmolLM2-135M fp32. Run: python -m bench.throughput [--requests 64 --new-tokens 64 --adapters 16]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from bench.common import machine, make_adapter, prompts, save
from mux.config import CacheConfig, EngineConfig, LoRAConfig, ModelConfig
from mux.engine.engine import Engine
from mux.engine.sequence import SamplingParams
from mux.engine.torch_thread import TorchThread
from mux.lora.layers import PAGE_RANKS, pages_for, targetable_linears
from mux.model.cpu import available_kernels
from mux.model.loader import default_model_dir
from mux.runtime import picks


def hf_generate(model, tok, texts, new_tokens, adapter_names=None) -> float:
    batch = tok(texts, return_tensors="pt", padding=True)
    cfg = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=2)
    kwargs = {"adapter_names": adapter_names} if adapter_names else {}
    t = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**batch, generation_config=cfg, **kwargs)
    elapsed = time.perf_counter() - t
    assert out.shape[1] - batch.input_ids.shape[1] == new_tokens
    return elapsed


def peft_per_request(peft, tok, texts, new_tokens, names) -> float:
    """The naive way to serve many adapters with PEFT: one request at a time, `set_adapter` before each."""
    t = time.perf_counter()
    for text, name in zip(texts, names, strict=True):
        peft.set_adapter(name)
        hf_generate(peft, tok, [text], new_tokens)
    return time.perf_counter() - t


def mux_generate(engine, texts, new_tokens, adapters) -> float:
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    t = time.perf_counter()
    outs = engine.generate(texts, params, adapters)
    elapsed = time.perf_counter() - t
    assert all(len(o.token_ids) == new_tokens for o in outs)
    return elapsed


def main() -> None:
    # Every torch call of this benchmark (baselines and engines) runs on one thread: a second OpenMP team
    # would slow every parallel region (see mux/engine/torch_thread.py), which is not what we measure.
    thread = TorchThread("bench")
    thread.call(run, thread)


def run(thread: TorchThread) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--adapters", type=int, default=16)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--mixed-ranks", default="", help="also run adapters of these ranks, cycled, e.g. 4,8,16,32")
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--set-adapter-requests", type=int, default=8, help="requests timed for PEFT set_adapter")
    ap.add_argument(
        "--levers",
        action="store_true",
        help="also run it unpacked, with torch's LoRA kernel, with SDPA attention, with transformers' layer ops, "
        "with decode steps through transformers' forward",
    )
    ap.add_argument(
        "--fixed-kernels",
        action="store_true",
        help="also run the engine with every linear on one fixed kernel (each of mux/model/cpu.py's), and with fp32 "
        "weights: the measured picks against the best fixed choice",
    )
    ap.add_argument("--repeat", type=int, default=2, help="interleaved repetitions; the best of each is reported")
    args = ap.parse_args()
    n, new = args.requests, args.new_tokens
    model_dir = default_model_dir()
    texts = prompts(n)
    tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tmp = Path(tempfile.mkdtemp(prefix="mux-bench-"))
    names = [f"a{i}" for i in range(args.adapters)]
    paths = [
        make_adapter(model_dir, tmp / name, r=args.rank, alpha=16, seed=i, std=0.02, base=base)
        for i, name in enumerate(names)
    ]
    per_request = [paths[i % len(paths)] for i in range(n)]
    mixed_ranks = [int(r) for r in args.mixed_ranks.split(",") if r]
    mixed_paths = [
        make_adapter(model_dir, tmp / f"m{i}", r=mixed_ranks[i % len(mixed_ranks)], seed=100 + i, std=0.02, base=base)
        for i in range(args.adapters if mixed_ranks else 0)
    ]
    # and each rank of the mix alone (as many adapters, same seeds): what the mixed batch would cost with no
    # penalty for mixing is the mean of their times
    rank_paths = {
        r: [
            make_adapter(model_dir, tmp / f"r{r}-{i}", r=r, seed=100 + i, std=0.02, base=base)
            for i in range(args.adapters)
        ]
        for r in sorted(set(mixed_ranks))
        if r != args.rank
    }
    # with mixed ranks every set of adapters stays resident in the pool: no loads timed
    ranks = [args.rank] * len(paths) + [*(mixed_ranks * args.adapters)[: len(mixed_paths)]]
    ranks += [r for r, rp in rank_paths.items() for _ in rp]
    rank_bytes = sum((m.in_features + m.out_features) * 4 for m in targetable_linears(base).values())
    pool_bytes = sum(pages_for(r) for r in ranks) * PAGE_RANKS * rank_bytes if mixed_paths else None
    tokens = n * new
    runs = {"hf_generate_base": lambda: hf_generate(base, tok, texts, new)}
    hf_generate(base, tok, texts[:4], 4)  # warm-up
    if not args.skip_peft:
        from peft import PeftModel

        peft_base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        peft = PeftModel.from_pretrained(peft_base, paths[0], adapter_name=names[0])
        for name, path in zip(names[1:], paths[1:], strict=True):
            peft.load_adapter(path, adapter_name=name)
        peft.eval()
        mixed = [names[i % len(names)] for i in range(n)]
        hf_generate(peft, tok, texts[:4], 4, mixed[:4])
        runs["peft_mixed_batch"] = lambda: hf_generate(peft, tok, texts, new, mixed)
        k = args.set_adapter_requests  # sequential, so a few requests give the rate
        runs["peft_set_adapter_per_request"] = lambda: peft_per_request(peft, tok, texts[:k], new, mixed[:k]) * n / k

    def make_engine(backend: str = "auto", dtype: str = "auto", **force) -> Engine:
        """force: internal choices forced while it is built (mux/runtime/picks.py: linear, lora_kernel, attention,
        layers, decode)."""
        with contextlib.ExitStack() as stack:
            for op, value in force.items():
                stack.enter_context(picks.force(op, value))
            engine = Engine(
                EngineConfig(
                    model=ModelConfig(model=str(model_dir), backend=backend, dtype=dtype),
                    lora=LoRAConfig(
                        max_loras=max(16, args.adapters),
                        max_lora_rank=max(16, args.rank, *mixed_ranks),
                        max_lora_bytes=pool_bytes,
                    ),
                    cache=CacheConfig(kv_cache_bytes=512 << 20, prefix_caching=False),  # 64 × 94 tokens: 277 MB
                ),
                torch_thread=thread,
            )
        mux_generate(engine, texts[: len(paths)], 2, paths)  # warm-up; adapters resident, as PEFT's are preloaded
        return engine

    engine = make_engine()
    runs["mux_base_only"] = lambda: mux_generate(engine, texts, new, [None] * n)
    runs[f"mux_{args.adapters}_adapters"] = lambda: mux_generate(engine, texts, new, per_request)
    if mixed_paths:  # B: heterogeneous ranks in one batch (each row computed at its adapter's own rank)
        mixed = [mixed_paths[i % len(mixed_paths)] for i in range(n)]
        mux_generate(engine, texts[: len(mixed_paths)], 2, mixed_paths)  # resident, like the others
        runs[f"mux_{args.adapters}_adapters_ranks_{args.mixed_ranks}"] = lambda: mux_generate(engine, texts, new, mixed)
        for r, rp in rank_paths.items():
            mux_generate(engine, texts[: len(rp)], 2, rp)
            runs[f"mux_{args.adapters}_adapters_rank_{r}"] = lambda rp=rp: mux_generate(
                engine, texts, new, [rp[i % len(rp)] for i in range(n)]
            )
    if args.levers:  # the torch backend (the glibc heap setting is process-wide, so it stays on here), then one choice
        unpacked = make_engine(backend="torch")
        runs[f"mux_{args.adapters}_adapters_unpacked"] = lambda: mux_generate(unpacked, texts, new, per_request)
        torch_kernel = make_engine(lora_kernel="torch")
        runs[f"mux_{args.adapters}_adapters_torch_kernel"] = lambda: mux_generate(torch_kernel, texts, new, per_request)
        sdpa = make_engine(attention="sdpa")
        runs[f"mux_{args.adapters}_adapters_sdpa_attention"] = lambda: mux_generate(sdpa, texts, new, per_request)
        torch_layers = make_engine(layers="torch")
        runs[f"mux_{args.adapters}_adapters_torch_layers"] = lambda: mux_generate(torch_layers, texts, new, per_request)
        forward = make_engine(decode="forward")
        runs[f"mux_{args.adapters}_adapters_transformers_forward"] = lambda: mux_generate(
            forward, texts, new, per_request
        )
    fixed = available_kernels() if args.fixed_kernels else ()
    for kernel in fixed:
        engine_k = make_engine(linear=kernel)
        runs[f"mux_{args.adapters}_adapters_linears_{kernel}"] = lambda e=engine_k: mux_generate(
            e, texts, new, per_request
        )
    if args.fixed_kernels:
        fp32 = make_engine(dtype="float32")
        runs[f"mux_{args.adapters}_adapters_fp32_weights"] = lambda: mux_generate(fp32, texts, new, per_request)

    # Interleaved repetitions, best of each: this shared 2-core machine is noisy run to run.
    samples: dict[str, list[float]] = {label: [] for label in runs}
    bar = tqdm(total=args.repeat * len(runs), desc="throughput runs")
    for rep in range(args.repeat):
        for label, run in runs.items():
            samples[label].append(tokens / run())
            bar.write(f"[{rep + 1}/{args.repeat}] {label:28s} {samples[label][-1]:8.1f} tok/s")
            bar.update()
    bar.close()
    results = {label: max(values) for label, values in samples.items()}

    adapters_key = f"mux_{args.adapters}_adapters"

    def ratios_of(tok_s: dict[str, float]) -> dict[str, float | None]:
        r = {
            "mux_adapters_vs_peft_mixed": None if args.skip_peft else tok_s[adapters_key] / tok_s["peft_mixed_batch"],
            "mux_adapters_vs_peft_set_adapter": None
            if args.skip_peft
            else tok_s[adapters_key] / tok_s["peft_set_adapter_per_request"],
            "mux_adapters_vs_mux_base": tok_s[adapters_key] / tok_s["mux_base_only"],
            "mux_adapters_vs_hf_base": tok_s[adapters_key] / tok_s["hf_generate_base"],
            "mux_base_vs_hf_base": tok_s["mux_base_only"] / tok_s["hf_generate_base"],
        }
        if mixed_paths:
            mixed_tok_s = tok_s[f"{adapters_key}_ranks_{args.mixed_ranks}"]
            r["mixed_ranks_vs_same_rank"] = mixed_tok_s / tok_s[adapters_key]
            # each rank alone: seconds per token averaged over the ranks of the mix = the mixed batch with no penalty
            alone = [tok_s[adapters_key if k == args.rank else f"{adapters_key}_rank_{k}"] for k in mixed_ranks]
            r["mixed_ranks_vs_its_ranks_alone"] = mixed_tok_s * sum(1 / t for t in alone) / len(alone)
        if args.levers:
            r["auto_vs_torch_backend"] = tok_s[adapters_key] / tok_s[f"{adapters_key}_unpacked"]
            r["native_vs_torch_lora_kernel"] = tok_s[adapters_key] / tok_s[f"{adapters_key}_torch_kernel"]
            r["native_vs_sdpa_attention"] = tok_s[adapters_key] / tok_s[f"{adapters_key}_sdpa_attention"]
            # both without the decode loop (it needs the C layers): the C layer ops alone
            r["native_vs_torch_layers"] = (
                tok_s[f"{adapters_key}_transformers_forward"] / tok_s[f"{adapters_key}_torch_layers"]
            )
            r["decode_loop_vs_transformers_forward"] = (
                tok_s[adapters_key] / tok_s[f"{adapters_key}_transformers_forward"]
            )
        if fixed:
            best = max(fixed, key=lambda k: tok_s[f"{adapters_key}_linears_{k}"])
            r[f"measured_picks_vs_best_fixed_kernel_{best}"] = (
                tok_s[adapters_key] / tok_s[f"{adapters_key}_linears_{best}"]
            )
            r["measured_picks_vs_fp32_weights"] = tok_s[adapters_key] / tok_s[f"{adapters_key}_fp32_weights"]
        return r

    # Two readings of the same runs: the ratio of each run's best, and the median of the ratios within each
    # round (runs seconds apart, so a lucky or unlucky moment of the machine moves both sides)
    ratios = ratios_of(results)
    rounds = [ratios_of({label: v[k] for label, v in samples.items()}) for k in range(args.repeat)]
    per_round = {k: None if v is None else statistics.median(r[k] for r in rounds) for k, v in ratios.items()}
    data = {
        "workload": vars(args),
        "machine": machine(),
        "cpu_kernels": engine.linear_plan.report() if engine.linear_plan else None,
        "tokens_per_s": results,
        "samples": samples,
        "ratios": ratios,
        "ratios_median_of_rounds": per_round,
    }
    print(json.dumps({"best of each": ratios, "median of rounds": per_round}, indent=2))
    rows = "\n".join(f"| {k} | {v:.1f} |" for k, v in results.items())
    ratio_rows = "\n".join(f"| {k} | {v:.2f}× | {per_round[k]:.2f}× |" for k, v in ratios.items() if v is not None)
    table = (
        f"# Throughput ({n} requests × {new} new tokens, {args.adapters} rank-{args.rank} adapters)\n\n"
        f"Machine: {json.dumps(data['machine'])}\n\nThe default engine's linears (measured picks): "
        f"{json.dumps(data['cpu_kernels'])}\n\n| run | tok/s |\n|---|---|\n{rows}\n\n"
        f"| ratio | of the best runs | median of the {args.repeat} rounds' ratios |\n|---|---|---|\n{ratio_rows}\n"
    )
    suffix = f"-ranks-{args.mixed_ranks.replace(',', '-')}" if mixed_paths else ""
    print("wrote", save(f"throughput-{args.adapters}-adapters{suffix}", data, table))


if __name__ == "__main__":
    main()
