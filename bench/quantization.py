"""--quantization side by side, one process, one run, SmolLM2-135M on this CPU: the decoder linears' resident bytes,
decode throughput with 16 rank-8 adapters at 1 and 8 streams and on workload A (64 streams), the unquantized engine
beside each; then the quality of each scheme against the unquantized weights (greedy agreement over fixed prompts,
perplexity on a fixed text, int4's group sizes among them) and the demo adapters' answers under int8.

Run: python -m bench.quantization [--repeat 2] [--skip-speed] [--skip-quality]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bench.common import machine, make_adapter, prompts, save
from mux.config import CacheConfig, EngineConfig, LoRAConfig, ModelConfig
from mux.engine.engine import Engine
from mux.engine.sequence import SamplingParams
from mux.engine.torch_thread import TorchThread
from mux.model import quant
from mux.model.cpu import PackedLinear
from mux.model.loader import default_model_dir, smollm2_gguf_path

REPO = Path(__file__).resolve().parent.parent
SCHEMES = ("none", "int8", "int4")
# (name, streams, tokens each): decode with adapters at a few streams is memory-bound, workload A compute-bound
LOADS = (("1 stream", 1, 64), ("8 streams", 8, 64), ("A: 64 streams", 64, 64))
TEXT = (  # perplexity text: plain prose the model has not been tuned on
    "The river rises in the hills to the north and runs south through a wide valley of farms and small towns. "
    "In spring the water is high and fast, and the old stone bridges are closed for a few weeks. By late summer "
    "it is slow and shallow enough to cross on foot in places, and children fish from the banks in the evening. "
    "The town at the mouth of the river grew up around a market where farmers sold grain, wool and cheese. Today "
    "the market still opens every Saturday, though most of the stalls sell bread, vegetables and flowers, and the "
    "old grain store has become a library with a small museum on its upper floor."
)
DEMO = {"demo/french": "Hello! How are you today?", "demo/json": "What is the capital of France?",
        "demo/shout": "Tell me about the weather."}  # fmt: skip


def main() -> None:
    thread = TorchThread("bench")  # every torch call on one OpenMP team (mux/engine/torch_thread.py)
    thread.call(run, thread)


def engine(thread: TorchThread, scheme: str) -> Engine:
    model = ModelConfig(quantization=scheme)
    cache = CacheConfig(kv_cache_bytes=512 << 20, prefix_caching=False)  # repeated prompts: no cache hits timed
    return Engine(EngineConfig(model=model, lora=LoRAConfig(max_loras=16), cache=cache), torch_thread=thread)


def speed(thread: TorchThread, repeat: int, tmp: Path, model_dir: Path) -> dict:
    adapters = [make_adapter(model_dir, tmp / f"a{i}", r=8, alpha=16, seed=i, std=0.02) for i in range(16)]
    engines = {s: engine(thread, s) for s in SCHEMES}
    out: dict = {s: {"weights": e.weights, "kernels": e.linear_plan.report(), "tok_s": {}} for s, e in engines.items()}
    out["fp32_decoder_linear_bytes"] = sum(  # the denominator of the bytes' ratios, whatever layouts "none" keeps
        4 * m.in_features * m.out_features
        for n, m in engines["none"].base.model.named_modules()
        if ".layers." in n and isinstance(m, PackedLinear)
    )
    for name, streams, tokens in LOADS:
        texts = prompts(streams, seed=streams)
        params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
        paths = [adapters[i % 16] for i in range(streams)]
        for e in engines.values():
            e.generate(texts[:2], SamplingParams(max_tokens=4, temperature=0), paths[:2])  # warm-up
        best = dict.fromkeys(SCHEMES, 0.0)
        for _ in range(repeat):  # interleaved: a busy moment of the machine hits every scheme alike
            for s, e in engines.items():
                t = time.perf_counter()
                e.generate(texts, params, paths)
                best[s] = max(best[s], streams * tokens / (time.perf_counter() - t))
        for s in SCHEMES:
            out[s]["tok_s"][name] = best[s]
        print(name, {s: round(v, 1) for s, v in best.items()}, flush=True)
    for e in engines.values():
        e.stop()
    return out


def variants(model_dir: Path) -> dict[str, callable]:
    """name -> a function quantizing a fresh fp32 model in place (the weights the kernels serve, dequantized)."""

    def requantized(scheme: str, group: int = quant.GROUP):
        def apply(model):
            for linear in quant.check(model, scheme, group):
                linear.weight.data = quant.quantize(linear.weight, scheme, group).dequantize()

        return apply

    return {
        "fp32": lambda model: None,
        "int8": requantized("int8"),
        "int4 (the GGUF's Q4_1)": lambda model: quant.quantize_model(model, "int4", smollm2_gguf_path()),
        **{f"int4 requantized, group {g}": requantized("int4", g) for g in (32, 64, 192)},
    }


def quality(model_dir: Path) -> dict:
    tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    chat = [
        tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in prompts(16, words=12, seed=7)
    ]
    text_ids = tok(TEXT, return_tensors="pt").input_ids
    batch = tok(chat, return_tensors="pt", padding=True)
    results, reference = {}, None
    for name, apply in variants(model_dir).items():
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        apply(model)
        with torch.no_grad():
            loss = model(text_ids, labels=text_ids).loss.item()
            gen = model.generate(**batch, max_new_tokens=32, do_sample=False, pad_token_id=tok.pad_token_id)
        tokens = gen[:, batch.input_ids.shape[1] :]
        reference = tokens if reference is None else reference
        results[name] = {"perplexity": math.exp(loss), "greedy_agreement": (tokens == reference).float().mean().item()}
        print(name, results[name], flush=True)
    return results


def demo(thread: TorchThread) -> dict:
    e = engine(thread, "int8")
    outs = {}
    for adapter, question in DEMO.items():
        tok = e.tokenizer
        prompt = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)  # fmt: skip
        out = e.generate([prompt], SamplingParams(max_tokens=32, temperature=0), [REPO / "adapters" / adapter])[0]
        outs[adapter] = {"question": question, "answer": out.text}
    e.stop()
    return outs


def run(thread: TorchThread) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=2, help="interleaved repetitions; the best of each is reported")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-quality", action="store_true")
    args = ap.parse_args()
    model_dir = default_model_dir()
    data: dict = {"machine": machine()}
    with tempfile.TemporaryDirectory(prefix="mux-bench-quant-") as tmp:
        if not args.skip_speed:
            data["speed"] = speed(thread, args.repeat, Path(tmp), model_dir)
    if not args.skip_quality:
        data["quality"] = quality(model_dir)
        data["demo_int8"] = demo(thread)
    save("quantization", data, table(data))


def table(data: dict) -> str:
    m = data["machine"]
    lines = [f"# bench.quantization: SmolLM2-135M, {m['cpu']} ({', '.join(m['cpu_flags'])}), {m['cores']} cores", ""]
    if "speed" in data:
        sp = data["speed"]
        fp = sp["fp32_decoder_linear_bytes"]
        lines += ["| | " + " | ".join(SCHEMES) + " |", "|---|" + "---|" * len(SCHEMES)]
        nbytes = {s: sp[s]["weights"]["decoder_linear_bytes"] for s in SCHEMES}
        row = [f"{nbytes[s] / 1e6:.1f} MB ({nbytes[s] / fp:.3f}×)" for s in SCHEMES]
        lines.append(f"| decoder linears' bytes (fp32: {fp / 1e6:.1f} MB) | " + " | ".join(row) + " |")
        for name, _, _ in LOADS:
            base = sp["none"]["tok_s"][name]
            row = [f"{sp[s]['tok_s'][name]:.1f} tok/s ({sp[s]['tok_s'][name] / base:.2f}×)" for s in SCHEMES]
            lines.append(f"| {name}, 16 adapters | " + " | ".join(row) + " |")
        lines += ["", "Kernels picked: " + "; ".join(
            f"{s}: {sorted({k for t in sp[s]['kernels']['linears'].values() for k in t})}" for s in SCHEMES
        ), ""]  # fmt: skip
    if "quality" in data:
        lines += ["| weights | perplexity | greedy agreement with fp32 |", "|---|---|---|"]
        for name, q in data["quality"].items():
            lines.append(f"| {name} | {q['perplexity']:.3f} | {q['greedy_agreement']:.3f} |")
        lines += ["", "Demo adapters under int8:", ""]
        for adapter, d in data["demo_int8"].items():
            lines.append(f"- `{adapter}`: {d['question']!r} → {d['answer']!r}")
    return "\n".join(lines)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
