"""The prefix cache, side by side: chat requests sharing a system prompt, on an engine with prefix caching and
one without (one process, one torch thread, runs interleaved).

Traffic: SmolLM2's chat template around one system prompt of ≈`--system-words` random words (a support bot's
instructions) and a distinct ≈30-token question per request, 4 rank-8 adapters of one tenant, greedy. Each round
asks new questions, so only the system prompt can be reused; one request per adapter warms the cache before the
timed runs (a server's steady state).
- TTFT: lone requests one after another (a generation of one token: its prefill and first sample), p50.
- Throughput: `--requests` concurrent requests × `--new-tokens` tokens.
The greedy tokens of both engines are compared request by request.

    python -m bench.prefix_cache [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from bench.common import machine, percentile, prompts, save, write_random_adapter
from mux.config import CacheConfig, EngineConfig, LoRAConfig
from mux.engine.engine import Engine
from mux.engine.sequence import SamplingParams
from mux.engine.torch_thread import TorchThread
from mux.model.loader import default_model_dir


def chat(engine: Engine, system: str, question: str) -> list[int]:
    tok = engine.tokenizer
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tok(text, add_special_tokens=False).input_ids


def main() -> None:
    thread = TorchThread("bench")  # both engines' torch work on one thread: one OpenMP team
    thread.call(run, thread)


def run(thread: TorchThread) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--system-words", type=int, default=200)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--lone", type=int, default=12, help="lone requests timed for TTFT per round")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.requests, args.lone, args.repeat = 16, 4, 1

    model_dir = default_model_dir()
    tmp = Path(tempfile.mkdtemp(prefix="mux-prefix-"))
    paths = [write_random_adapter(model_dir, tmp / f"a{i}", r=8, seed=i, std=0.02) for i in range(4)]
    engines = {
        on: Engine(
            EngineConfig(
                lora=LoRAConfig(max_loras=4, max_lora_rank=16),
                cache=CacheConfig(kv_cache_bytes=1 << 30, prefix_caching=on),
            ),
            torch_thread=thread,
        )
        for on in (True, False)
    }
    system = prompts(1, words=args.system_words, seed=99)[0]
    warm = [chat(engines[True], system, q) for q in prompts(len(paths), seed=98)]
    prompt_len = len(warm[0])
    one = SamplingParams(max_tokens=1, temperature=0)
    many = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    for engine in engines.values():
        engine.generate(warm, many, paths)  # adapters resident; the system prompt cached (on the caching engine)

    ttft: dict[bool, list[float]] = {True: [], False: []}
    tok_s: dict[bool, list[float]] = {True: [], False: []}
    same = total = 0
    bar = tqdm(total=args.repeat * 2, desc="prefix cache rounds")
    for rnd in range(args.repeat):
        lone = [chat(engines[True], system, q) for q in prompts(args.lone, seed=1000 + rnd)]
        batch = [chat(engines[True], system, q) for q in prompts(args.requests, seed=2000 + rnd)]
        adapters = [paths[i % len(paths)] for i in range(len(batch))]
        outs = {}
        for on, engine in engines.items():
            for i, ids in enumerate(lone):
                t = time.perf_counter()
                engine.generate([ids], one, [paths[i % len(paths)]])
                ttft[on].append(time.perf_counter() - t)
            t = time.perf_counter()
            outs[on] = engine.generate(batch, many, adapters)
            tok_s[on].append(len(batch) * args.new_tokens / (time.perf_counter() - t))
            bar.write(
                f"[{rnd + 1}/{args.repeat}] prefix caching {'on ' if on else 'off'}: TTFT p50 "
                f"{percentile(ttft[on][-len(lone) :], 0.5) * 1e3:.0f} ms, {tok_s[on][-1]:.1f} tok/s"
            )
            bar.update()
        total += len(batch)
        same += sum(a.token_ids == b.token_ids for a, b in zip(outs[True], outs[False], strict=True))
    bar.close()

    blocks = engines[True].blocks
    hit_rate = blocks.hit_tokens / blocks.queried_tokens
    p50 = {on: percentile(v, 0.5) for on, v in ttft.items()}
    best = {on: max(v) for on, v in tok_s.items()}
    median = {on: statistics.median(v) for on, v in tok_s.items()}
    m = machine()
    table = "\n".join(
        [
            f"# Prefix cache: chat requests sharing a {prompt_len}-token prompt start (SmolLM2, 4 rank-8 adapters)",
            "",
            f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['device']}. {args.repeat} interleaved "
            f"rounds, new questions each round; {args.lone} lone requests a round for TTFT, "
            f"{args.requests} concurrent × {args.new_tokens} tokens for throughput.",
            "",
            "| | prefix caching on | off | on vs off |",
            "|---|---|---|---|",
            f"| TTFT p50, lone request (ms) | {p50[True] * 1e3:.0f} | {p50[False] * 1e3:.0f} | "
            f"**{p50[False] / p50[True]:.2f}×** faster |",
            f"| throughput, best round (tok/s) | {best[True]:.1f} | {best[False]:.1f} | "
            f"**{best[True] / best[False]:.2f}×** |",
            f"| throughput, median round (tok/s) | {median[True]:.1f} | {median[False]:.1f} | "
            f"{median[True] / median[False]:.2f}× |",
            "",
            f"Prompt tokens served from the cache: {hit_rate:.0%} (of every prompt the caching engine saw). "
            f"Greedy tokens equal between the two engines: {same} of {total} requests.",
        ]
    )
    print(table)
    data = {
        "machine": m,
        "args": vars(args),
        "prompt_tokens": prompt_len,
        "ttft_s": {"on": ttft[True], "off": ttft[False]},
        "tokens_per_s": {"on": tok_s[True], "off": tok_s[False]},
        "ratios": {"ttft_off_vs_on": p50[False] / p50[True], "throughput_on_vs_off": best[True] / best[False]},
        "hit_rate": hit_rate,
        "greedy_equal": [same, total],
    }
    save("prefix-cache", data, table)


if __name__ == "__main__":
    main()
