"""GPU check (issue 6): the CUDA path against the CPU reference, then S-LoRA-style scaling on a 7B-shaped model.

1. ops: `lora_add_` in its layouts (blocks of decodes, of a prefill, per-token: the Triton kernel on CUDA)
   on the device, fp32 and fp16, vs the per-token reference on the CPU; paged decode attention (Triton on
   CUDA) vs SDPA over each sequence's gathered blocks on the CPU, for GQA (SmolLM2's 9/3 heads) and plain (7B's) shapes.
2. engine: a tiny random Llama with four PEFT adapters (ranks 4/8/16, one with rsLoRA) in one batch on the
   device (decode steps replaying CUDA graphs): greedy tokens equal PEFT's on the CPU; the manager keeps host
   copies in pinned memory and has its own copy stream for the loader thread's loads (a host-tier hit is
   copied in stream order by the engine).
   Penalties, logit bias, top and prompt logprobs and seeded sampling on the device equal a CPU engine's.
   In fp16 and bf16 on the device: the share of greedy tokens equal to PEFT's in the same dtype on the device,
   and each one's against PEFT in fp32 (reported, not judged: rounding may flip a near tie).
3. scaling: a Llama-7B-shaped model with random fp16 weights (no download), rank-8 adapters on q_proj/v_proj
   (PEFT's default for Llama), one request per adapter round robin: mux throughput with 5 and with 1,000
   adapters live (target: ≤ 10% loss), mux with 5 adapters and no CUDA graphs, and with each step's text and
   stream pushes after it rather than during the next step (the levers), and PEFT's mixed
   batch (`adapter_names=`) on the same GPU with the 5 adapters (target: mux ≥ 10×). The 1,000 adapter
   directories share 8 weight files through hard links (each directory is still its own adapter to mux: its own
   key, host copy and slot), so the disk holds 8, not 1,000.

Run on a CUDA machine (a few minutes): bash bench/gpu_check.sh. `--small` runs every part at toy sizes on any
device (the CPU included), to check the script itself.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from bench.common import RESULTS, build_tiny_model, group_rows, machine, make_adapter, save, write_random_adapter
from bench.gpu_profile import kernel_times, rate, step_breakdown
from mux import triton_ops
from mux.config import CacheConfig, EngineConfig, LoRAConfig, ModelConfig, SchedulerConfig
from mux.engine.engine import Engine
from mux.engine.sequence import SamplingParams
from mux.engine.stream import Completion
from mux.lora.ops import build_lora_batch, lora_add_, lora_delta_reference, per_token_batch, stacked_pool
from mux.model.loader import BaseModel


def check_ops(device: str, features: tuple[int, int] = (1100, 520)) -> dict:
    """Max |error| of the kernel on `device` vs the CPU reference, per layout and dtype; features (in, out), by
    default not multiples of the kernels' blocks."""
    out = {}
    cases = {"blocks": [0, 1, 2, 3] * 8 + [5, -1], "gathered": [1] * 300 + [0, 7], "per_token": [3, -1, 0, 7] * 70}
    for dtype, tol in ((torch.float32, 1e-4), (torch.float16, 2e-2)):
        for layout, token_slots in cases.items():
            g = torch.Generator().manual_seed(0)
            x = torch.randn(len(token_slots), features[0], generator=g)
            a = torch.randn(8, 16, features[0], generator=g) * 0.1
            b = torch.randn(8, 16, features[1], generator=g) * 0.1
            ref = lora_delta_reference(x, a, b, token_slots)
            if layout == "per_token":
                batch = per_token_batch(torch.tensor(token_slots, device=device), 16)
            else:
                batch = build_lora_batch(group_rows(token_slots), 16, device, dtype)
            pool_a, pool_b, table = stacked_pool(a, b, shuffle=0)  # rank rows scattered, as pages lie
            xd, ad, bd = (t.to(device, dtype) for t in (x, pool_a, pool_b))
            table = table.to(device)
            kind = str(dtype).removeprefix("torch.")
            y = torch.zeros(len(token_slots), features[1], dtype=dtype, device=device)
            lora_add_(y, xd, ad, bd, table, batch)
            out[f"{layout}_{kind}"] = _error(y, ref, tol)
            if layout == "per_token" and triton_ops.serves(device):  # both Triton paths, whichever the pick is
                for path, fused in (("two_kernels", False), ("one_kernel", True)):
                    y.zero_()
                    triton_ops.lora_add(y, xd, ad, bd, table, batch.token_slots, 16, fused)
                    out[f"per_token_{path}_{kind}"] = _error(y, ref, tol)
    if triton_ops.serves(device):
        out.update(check_paged_attention(device))
    return out


def _error(y: torch.Tensor, ref: torch.Tensor, tol: float) -> dict:
    """y's largest error from the CPU reference, relative to the reference's scale (at least 1)."""
    err = (y.float().cpu() - ref).abs().max().item() / max(1.0, ref.abs().max().item())
    return {"rel_err": err, "ok": err <= tol}


def check_paged_attention(device: str) -> dict:
    """The Triton decode attention over scattered blocks vs SDPA over each sequence's gathered rows (CPU)."""
    out = {}
    bs, g = 16, torch.Generator().manual_seed(1)
    for heads, kv_heads, head_dim in ((9, 3, 64), (32, 32, 128)):
        lens = [1, 5, 16, 17, 100, 333]
        nb = max(-(-n // bs) for n in lens)
        blocks = torch.randperm(len(lens) * nb + 4, generator=g)[: len(lens) * nb].view(len(lens), nb)  # [B, nb]
        k = torch.randn((len(lens) * nb + 4) * bs, kv_heads, head_dim, generator=g)  # [rows, Hkv, D]
        v = torch.randn(k.shape, generator=g)
        q = torch.randn(len(lens), heads, head_dim, generator=g)  # [B, H, D]
        ref = triton_ops.paged_decode_reference(q, k, v, blocks, lens, bs)
        for dtype, tol in ((torch.float32, 1e-4), (torch.float16, 2e-2)):
            got = torch.empty(len(lens), heads, head_dim, dtype=dtype, device=device)
            dev = [t.to(device, dtype) for t in (q, k, v)]
            triton_ops.paged_decode(dev[0], dev[1], dev[2], blocks.to(device), torch.tensor(lens, device=device),
                                    bs, head_dim**-0.5, got)  # fmt: skip
            err = (got.float().cpu() - ref).abs().max().item()
            out[f"paged_decode_{heads}x{head_dim}_{str(dtype).removeprefix('torch.')}"] = {
                "rel_err": err,
                "ok": err <= tol,
            }
    return out


# Sampling that post-processes the logits on the device (one of each kind in one batch).
PROCESSED = [
    SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, repetition_penalty=1.3, top_logprobs=3),
    SamplingParams(
        max_tokens=12,
        temperature=0,
        ignore_eos=True,
        presence_penalty=0.5,
        frequency_penalty=0.7,
        logit_bias=((11, 5.0), (12, -100.0)),
    ),
    SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, prompt_logprobs=2),
    SamplingParams(max_tokens=12, temperature=0.8, top_k=20, top_p=0.9, min_p=0.05, seed=7, ignore_eos=True),
]


def processed_sampling_equal(got: list[Completion], want: list[Completion], tol: float = 1e-3) -> bool:
    """Same tokens, alternatives and prompt-token ranks (exactly); logprobs within `tol`."""

    def close(a: list[float], b: list[float]) -> bool:
        return len(a) == len(b) and all(
            x == y or abs(x - y) <= tol for x, y in zip(a, b, strict=True)
        )  # x == y: both -inf

    def same_top(a: tuple | None, b: tuple | None) -> bool:
        if a is None or b is None:
            return a is b
        return [i for i, _ in a] == [i for i, _ in b] and close([p for _, p in a], [p for _, p in b])

    def same_prompt(a, b) -> bool:
        if a is None or b is None:
            return a is b
        return a.rank == b.rank and close([a.logprob], [b.logprob]) and same_top(a.top, b.top)

    for g, w in zip(got, want, strict=True):
        if g.token_ids != w.token_ids or not close(g.logprobs, w.logprobs) or len(g.top) != len(w.top):
            return False
        if not all(same_top(a, b) for a, b in zip(g.top, w.top, strict=True)):
            return False
        gp, wp = g.prompt_logprobs, w.prompt_logprobs
        if (gp is None) != (wp is None) or len(gp or []) != len(wp or []):
            return False
        if not all(same_prompt(a, b) for a, b in zip(gp or [], wp or [], strict=True)):
            return False
    return True


def check_engine(device: str, tokenizer_dir: Path, root: Path) -> dict:
    """Greedy tokens of four adapters in one device batch vs PeftModel run alone on the CPU; processed sampling
    (penalties, bias, logprobs, seeded) in one device batch vs the same on a CPU engine."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_dir = build_tiny_model(root / "tiny", "llama", tokenizer_dir)
    specs = [dict(r=4), dict(r=8, alpha=32), dict(r=16, use_rslora=True), dict(r=8, targets=["q_proj", "v_proj"])]
    adapters = [make_adapter(model_dir, root / f"tiny-a{i}", seed=i, **s) for i, s in enumerate(specs)]
    prompts = [[5 + i, 17, 300 + i, 42, 7] for i in range(len(adapters))]

    def engine_on(dev: str, dtype: str = "float32", prefix_caching: bool = False) -> Engine:
        return Engine(
            EngineConfig(
                model=ModelConfig(model=str(model_dir), device=dev, dtype=dtype),
                lora=LoRAConfig(max_loras=4, max_lora_rank=16),
                cache=CacheConfig(kv_cache_bytes=64 << 20, prefix_caching=prefix_caching),
            )
        )

    engine = engine_on(device)
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    got = [c.token_ids for c in engine.generate(prompts, params, adapters)]
    processed = engine.generate(prompts, PROCESSED, adapters)
    pinned = all(a.is_pinned() and b.is_pinned() for w in engine.adapters.host.values() for a, b in w.modules.values())
    copy_stream = engine.adapters._stream is not None
    graphs = engine.runner.graphs.num_graphs if engine.runner.graphs is not None else 0
    engine.stop()
    # the prefix cache on the device: a 40-token start shared by the prompts, each run twice (the second time its
    # first two blocks come from the cache and its prefill attends to them in place)
    long_prompts = [list(range(100, 140)) + ids for ids in prompts]
    engine = engine_on(device, prefix_caching=True)
    cached = [[c.token_ids for c in engine.generate(long_prompts, params, adapters)] for _ in range(2)]
    hit_tokens = engine.blocks.hit_tokens
    engine.stop()
    reference = engine_on("cpu")
    processed_cpu = reference.generate(prompts, PROCESSED, adapters)
    reference.stop()
    want, want_long = [], []
    for ids, long_ids, path in zip(prompts, long_prompts, adapters, strict=True):
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), path).eval()
        for x, into in ((ids, want), (long_ids, want_long)):
            with torch.no_grad():
                out = peft.generate(torch.tensor([x]), max_new_tokens=16, min_new_tokens=16, do_sample=False)
            into.append(out[0, len(x) :].tolist())
    on_cuda = device.startswith("cuda")
    return {
        "tokens_equal_peft": got == want,
        "half_precision": {d: half_agreement(device, d, engine_on, model_dir, prompts, adapters, want) for d in HALF},
        "processed_equal_cpu": processed_sampling_equal(processed, processed_cpu),
        "prefix_cache": {"hit_tokens": hit_tokens, "tokens_equal_peft": cached == [want_long, want_long]},
        "pinned_host_copies": pinned if on_cuda else None,
        "copy_stream": copy_stream if on_cuda else None,
        "decode_graphs": graphs,
    }


HALF = ("float16", "bfloat16")


def half_agreement(device: str, dtype: str, engine_on, model_dir: Path, prompts, adapters, fp32) -> dict:
    """Greedy tokens of the engine in `dtype` on `device` against PeftModel's in the same dtype on the same
    device, and both against PEFT's in float32 on the CPU (`fp32`): the share of tokens equal up to each
    request's first difference (rounding may flip a near tie, after which the two continue from different
    text). mux's half path is as good as PEFT's when its agreement with fp32 is at least PEFT's."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    engine = engine_on(device, dtype)
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    mine = [c.token_ids for c in engine.generate(prompts, params, adapters)]
    engine.stop()
    theirs = []
    for ids, path in zip(prompts, adapters, strict=True):
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(device)
        peft = PeftModel.from_pretrained(base, path).eval()
        with torch.no_grad():
            out = peft.generate(
                torch.tensor([ids], device=device), max_new_tokens=16, min_new_tokens=16, do_sample=False
            )
        theirs.append(out[0, len(ids) :].tolist())

    def agreement(a: list[list[int]], b: list[list[int]]) -> float:
        pairs = zip(a, b, strict=True)
        same = [next((i for i, (x, y) in enumerate(zip(u, v, strict=True)) if x != y), len(u)) for u, v in pairs]
        return round(sum(same) / sum(len(u) for u in a), 3)

    return {
        "mux_vs_peft": agreement(mine, theirs),
        "mux_vs_fp32": agreement(mine, fp32),
        "peft_vs_fp32": agreement(theirs, fp32),
    }


def scaling(device: str, tokenizer_dir: Path, root: Path, args) -> dict:
    """mux throughput with few and many adapters live, and PEFT mixed batch, on one 7B-shaped random model."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    dims = (
        dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8)
        if args.small
        else dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32)
    )
    cfg = LlamaConfig(**dims, vocab_size=len(tokenizer), max_position_embeddings=4096, tie_word_embeddings=False)
    model_dir = root / "llama-7b-shaped"
    cfg.save_pretrained(model_dir)  # adapters are written from the config; the weights stay in memory
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    counts = [int(n) for n in args.adapters.split(",")]
    distinct = [
        write_random_adapter(model_dir, root / "w" / f"{i}", r=8, targets=["q_proj", "v_proj"], seed=i, dtype=dtype)
        for i in range(8)
    ]
    paths = []
    for i in range(max(counts)):
        d = root / "adapters" / f"a{i:04d}"
        d.mkdir(parents=True)
        src = distinct[i % len(distinct)]
        os.link(src / "adapter_model.safetensors", d / "adapter_model.safetensors")
        shutil.copy(src / "adapter_config.json", d)
        paths.append(d)

    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        with torch.device(device):
            old = torch.get_default_dtype()
            torch.set_default_dtype(dtype)
            try:
                return LlamaForCausalLM(copy.deepcopy(cfg)).eval().requires_grad_(False)  # own config
            finally:
                torch.set_default_dtype(old)

    rnd = random.Random(0)
    prompts = [[rnd.randrange(100, len(tokenizer)) for _ in range(args.prompt_tokens)] for _ in range(args.requests)]
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    tokens = args.requests * args.new_tokens
    base = BaseModel(build(), tokenizer, model_dir, "llama-7b-shaped", (), 4096)
    engine = Engine(
        EngineConfig(
            model=ModelConfig(device=device, dtype=str(dtype).removeprefix("torch.")),
            lora=LoRAConfig(
                max_loras=max(counts), max_lora_rank=8, max_cpu_loras=max(counts), max_cpu_adapter_bytes=64 << 30
            ),
            cache=CacheConfig(kv_cache_bytes=(40 << 30) if not args.small else (256 << 20), prefix_caching=False),
            scheduler=SchedulerConfig(max_num_seqs=args.batch, max_num_batched_tokens=8192),
        ),
        base=base,
    )
    results: dict = {"model": dims, "dtype": str(dtype), "requests": args.requests, "new_tokens": args.new_tokens}
    for n in counts:
        refs = [engine.prepare_adapter(p) for p in tqdm(paths[:n], desc=f"{n} adapters into the host tier")]
        per_request = [refs[i % n] for i in range(args.requests)]
        engine.generate(prompts[: max(n, 8)], SamplingParams(max_tokens=2, ignore_eos=True), per_request[: max(n, 8)])

        results[f"mux_{n}_adapters_tok_s"] = rate(engine, prompts, params, per_request, tokens, reps=2)
        print(f"mux, {n} adapters live: {results[f'mux_{n}_adapters_tok_s']:.0f} tok/s", flush=True)
        graphs = engine.runner.graphs
        if n == counts[0] and graphs is not None:  # the lever: the same traffic with every step eager
            graphs.enabled = False
            results[f"mux_{n}_adapters_eager_tok_s"] = rate(engine, prompts, params, per_request, tokens, reps=1)
            graphs.enabled = True
            print(f"mux, {n} adapters, eager: {results[f'mux_{n}_adapters_eager_tok_s']:.0f} tok/s", flush=True)
        if n == counts[0]:  # the lever: each step's text and pushes after the step, not during the next one
            overlap, engine.overlap_output = engine.overlap_output, False
            results[f"mux_{n}_adapters_no_overlap_tok_s"] = rate(engine, prompts, params, per_request, tokens, reps=1)
            engine.overlap_output = overlap
            print(f"mux, {n} adapters, no overlap: {results[f'mux_{n}_adapters_no_overlap_tok_s']:.0f} tok/s")
        results[f"steps_{n}_adapters"] = step_breakdown(engine, prompts, params, per_request)
        print(f"steps, {n} adapters:", json.dumps(results[f"steps_{n}_adapters"]), flush=True)
    engine.generate(prompts[: args.batch], SamplingParams(max_tokens=8, ignore_eos=True), None)  # a base-only graph
    results["decode_graphs"] = engine.runner.graphs.num_graphs if engine.runner.graphs is not None else 0
    if triton_ops.serves(device):
        # the engine's LoRA add per shape, timed at first use: (in, out, rank, many) -> ms of two kernels, of one
        results["lora_add_pick_ms"] = {str(k): v for k, v in triton_ops.FUSED_TIMES.items()}
        print("LoRA add, two kernels vs one:", json.dumps(results["lora_add_pick_ms"]), flush=True)
        results["kernel_ms"] = kernel_times(device, engine.runner.graphs)
        print("kernel ms:", json.dumps(results["kernel_ms"]), flush=True)
    engine.stop()
    del engine, base
    if device.startswith("cuda"):
        torch.cuda.empty_cache()

    from peft import PeftModel

    n = counts[0]
    peft = PeftModel.from_pretrained(build(), paths[0], adapter_name="a0")
    for i in range(1, n):
        peft.load_adapter(paths[i], adapter_name=f"a{i}")
    peft.eval()
    names = [f"a{i % n}" for i in range(args.requests)]
    t = time.perf_counter()
    with torch.no_grad():
        for s in range(0, args.requests, args.batch):
            ids = torch.tensor(prompts[s : s + args.batch], device=device)
            out = peft.generate(
                input_ids=ids,
                adapter_names=names[s : s + args.batch],
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
            assert out.shape[1] == args.prompt_tokens + args.new_tokens
    results[f"peft_mixed_batch_{n}_adapters_tok_s"] = tokens / (time.perf_counter() - t)
    print(f"PEFT mixed batch, {n} adapters: {results[f'peft_mixed_batch_{n}_adapters_tok_s']:.0f} tok/s", flush=True)
    few, many = counts[0], counts[-1]
    results["many_vs_few"] = results[f"mux_{many}_adapters_tok_s"] / results[f"mux_{few}_adapters_tok_s"]
    peft_rate = results[f"peft_mixed_batch_{few}_adapters_tok_s"]
    results["mux_vs_peft_mixed"] = results[f"mux_{few}_adapters_tok_s"] / peft_rate
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokenizer", default=str(Path.home() / ".cache/lora-mux/smollm2-135m-instruct"))
    ap.add_argument("--small", action="store_true", help="toy sizes on any device: checks the script")
    ap.add_argument("--adapters", default="5,1000")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=256, help="mux max_num_seqs and PEFT's batch")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--out", default="", help="also copy the result files here (e.g. $OUT on the device machine)")
    args = ap.parse_args()
    if args.small:
        args.adapters, args.requests, args.batch, args.new_tokens = "5,40", 80, 32, 8
    root = Path(tempfile.mkdtemp(prefix="mux-gpu-check-"))
    tokenizer_dir = Path(args.tokenizer)
    data: dict = {"machine": machine(), "device": args.device, "small": args.small}
    data["ops"] = check_ops(args.device)
    print("ops:", json.dumps(data["ops"]), flush=True)
    data["engine"] = check_engine(args.device, tokenizer_dir, root)
    print("engine:", json.dumps(data["engine"]), flush=True)
    data["scaling"] = scaling(args.device, tokenizer_dir, root, args)
    s = data["scaling"]
    few, many = args.adapters.split(",")[0], args.adapters.split(",")[-1]
    lines = [
        f"# GPU check ({'toy sizes' if args.small else 'Llama-7B-shaped, fp16'}, {args.device})",
        "",
        f"Machine: {json.dumps(data['machine'])}",
        "",
        "Kernel vs CPU reference (relative max error): "
        + ", ".join(f"{k} {v['rel_err']:.1e} {'ok' if v['ok'] else 'FAIL'}" for k, v in data["ops"].items()),
        "",
        f"Engine on {args.device}, 4 adapters in one batch: greedy tokens equal PEFT on the CPU: "
        f"{data['engine']['tokens_equal_peft']}; penalties, logit bias, logprobs and seeded sampling equal the "
        f"CPU engine: {data['engine']['processed_equal_cpu']}; "
        f"prefix cache (hit tokens, greedy tokens equal PEFT): {json.dumps(data['engine']['prefix_cache'])}; "
        f"pinned host copies: {data['engine']['pinned_host_copies']}; "
        f"copy stream: {data['engine']['copy_stream']}; decode graphs captured: {data['engine']['decode_graphs']}; "
        "half precision, share of greedy tokens equal (up to the first difference) mux vs PEFT in the same dtype, "
        "and each vs PEFT in fp32: " + json.dumps(data["engine"]["half_precision"]),
        "",
        f"| run ({s['requests']} requests × {s['new_tokens']} tokens) | tok/s |",
        "|---|---|",
        *(f"| {k.removesuffix('_tok_s')} | {v:.0f} |" for k, v in s.items() if k.endswith("_tok_s")),
        "",
        *(
            f"Step phases, {k.removeprefix('steps_')} (ms per step): {json.dumps(v)}"
            for k, v in s.items()
            if k.startswith("steps_")
        ),
        f"Kernel ms: {json.dumps(s.get('kernel_ms'))}",
        f"LoRA add timed at first use, (in, out, rank, many rows) -> ms of two kernels, of one: "
        f"{json.dumps(s.get('lora_add_pick_ms'))}",
        "",
        f"{many} vs {few} adapters live: **{s['many_vs_few']:.2f}×** (target ≥ 0.90×); "
        f"mux vs PEFT mixed batch ({few} adapters): **{s['mux_vs_peft_mixed']:.1f}×** (target ≥ 10×)",
    ]
    path = save("gpu-check-small" if args.small else "gpu-check", data, "\n".join(lines))
    print("\n".join(lines))
    if args.out:
        for p in (path, path.with_suffix(".md")):
            shutil.copy(p, args.out)
    shutil.rmtree(root, ignore_errors=True)
    print("wrote", path, "in", RESULTS)


if __name__ == "__main__":
    main()
