"""Workload A on vLLM's CPU build, in the peers' virtualenv: `python peers_vllm_worker.py SPEC.json OUT.json`.

Run by bench/peers.py with `.venv-peers/vllm/bin/python`; it imports only the standard library and vLLM (never
mux). SPEC holds the model directory, prompts, adapter directories, dtype and sizes; OUT gets seconds per run,
tokens counted from the outputs. One dtype and one engine per process: vLLM frees an engine's memory and
OpenMP team only when the process ends.
"""

from __future__ import annotations

import json
import sys
import time


def timed(llm, texts, params, loras) -> tuple[float, int]:
    """(seconds, generated tokens) of one offline `LLM.generate` over the whole batch."""
    t = time.perf_counter()
    outs = llm.generate(texts, params, lora_request=loras, use_tqdm=False)
    elapsed = time.perf_counter() - t
    return elapsed, sum(len(o.outputs[0].token_ids) for o in outs)


def best(fn, repeat: int) -> dict:
    """The fastest of `repeat` calls of fn, with every sample."""
    samples = [fn() for _ in range(repeat)]
    seconds, tokens = min(samples)
    return {"seconds": seconds, "tokens": tokens, "samples_s": [s for s, _ in samples]}


def run(spec: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    texts, paths, new = spec["prompts"], spec["adapters"], spec["new_tokens"]
    with_lora = bool(paths)
    began = time.perf_counter()
    llm = LLM(
        model=spec["model"],
        dtype=spec["dtype"],
        seed=0,
        max_model_len=spec["max_model_len"],
        max_num_seqs=len(texts),
        enable_prefix_caching=False,  # every round sends the same prompts; mux's runs cache nothing either
        enable_lora=with_lora,
        max_loras=max(1, len(paths)),  # every adapter resident, as mux's are after its warm-up
        max_cpu_loras=max(1, len(paths)),
        max_lora_rank=spec["max_lora_rank"],
    )
    load_s = time.perf_counter() - began
    greedy = SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True)
    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    few = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    requests = [LoRARequest(f"a{i}", i + 1, p) for i, p in enumerate(paths)]
    per_request = [requests[i % len(requests)] for i in range(len(texts))] if requests else None
    # warm-up: every adapter loaded and resident (as mux's are), each batch shape run once
    lone = requests[:1] or None
    llm.generate(texts, few, use_tqdm=False)
    if requests:
        llm.generate(texts[: len(requests)], one, lora_request=requests, use_tqdm=False)
        llm.generate(texts, few, lora_request=per_request, use_tqdm=False)
    llm.generate(texts[:1], greedy, lora_request=lone, use_tqdm=False)
    runs = {"base_only": best(lambda: timed(llm, texts, greedy, None), spec["repeat"])}
    if requests:
        runs[f"{len(requests)}_adapters"] = best(lambda: timed(llm, texts, greedy, per_request), spec["repeat"])
    # one stream, one adapter (or none): the gap between tokens is (64-token request - 1-token request) / 63
    runs["one_stream"] = best(lambda: timed(llm, texts[:1], greedy, lone), spec["repeat"])
    runs["one_stream_first_token"] = best(lambda: timed(llm, texts[:1], one, lone), spec["repeat"])
    import torch
    import vllm

    return {
        "vllm": vllm.__version__,
        "torch": torch.__version__,
        "dtype": spec["dtype"],
        "lora": with_lora,
        "load_s": load_s,
        "runs": runs,
    }


def main() -> None:
    spec_path, out_path = sys.argv[1], sys.argv[2]
    with open(spec_path) as f:
        spec = json.load(f)
    result = run(spec)
    with open(out_path, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
