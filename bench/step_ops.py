"""Per-step op levers, side by side at SmolLM2 shapes: the sampler's argmax + log-normaliser (torch vs the C pass
in mux/csrc/sampling.c) over [B, 49152] logits, and the 61 RMSNorms of a step (transformers' six-op module vs one
`F.rms_norm` each; measured 1.12-1.64x at batch 1-8 and 0.94-1.12x at 64 in two runs, at most ~0.4 ms a
step, so not adopted). Best of interleaved repetitions.
Run: python -m bench.step_ops
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from bench.common import best_time, machine, save
from mux.engine.sampler import _argmax_logsumexp
from mux.engine.torch_thread import TorchThread

VOCAB, HIDDEN, NORMS = 49152, 576, 61


def measure(batch: int) -> dict[str, float]:
    logits = torch.randn(batch, VOCAB) * 3
    hidden = torch.randn(batch, HIDDEN)
    plain = [LlamaRMSNorm(HIDDEN, eps=1e-5) for _ in range(NORMS)]
    weights = [n.weight for n in plain]
    ops = {
        "sampler torch": lambda: (logits.argmax(-1), torch.logsumexp(logits, -1)),
        "sampler C": lambda: _argmax_logsumexp(logits),
        "61 RMSNorms, transformers": lambda: [n(hidden) for n in plain],
        "61 RMSNorms, fused": lambda: [F.rms_norm(hidden, (HIDDEN,), w, 1e-5) for w in weights],
    }
    times: dict[str, float] = {}
    with torch.inference_mode():
        for _ in range(3):  # interleaved
            for label, fn in ops.items():
                times[label] = min(times.get(label, float("inf")), best_time(fn, 15) * 1e6)
    return times


def run() -> dict:
    torch.manual_seed(0)
    out = {}
    for batch in (1, 8, 64):
        out[batch] = measure(batch)
        print(batch, json.dumps(out[batch]), flush=True)
    return out


def main() -> None:
    results = TorchThread("bench").call(run)
    lines = [
        "# Per-step op levers (SmolLM2 shapes: vocabulary 49152, hidden 576, 61 RMSNorms per step)",
        "",
        "The C sampler pass is the engine's (CPU float32); the fused RMSNorm (`F.rms_norm`) is not adopted.",
        "",
        f"Machine: {json.dumps(machine())}",
        "",
        "µs per step, best of interleaved repetitions.",
        "",
        "| batch | sampler torch | sampler C | speed-up | 61 RMSNorms transformers | F.rms_norm | speed-up |",
        "|---|---|---|---|---|---|---|",
    ]
    for batch, t in results.items():
        s_torch, s_c = t["sampler torch"], t["sampler C"]
        n_hf, n_fused = t["61 RMSNorms, transformers"], t["61 RMSNorms, fused"]
        lines.append(
            f"| {batch} | {s_torch:.0f} | {s_c:.0f} | {s_torch / s_c:.2f}× | {n_hf:.0f} | {n_fused:.0f} | "
            f"{n_hf / n_fused:.2f}× |"
        )
    print("wrote", save("step-ops", {"machine": machine(), "us_per_step": results}, "\n".join(lines)))


if __name__ == "__main__":
    main()
