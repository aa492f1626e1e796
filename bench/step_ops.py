"""Per-step op levers, side by side at SmolLM2 shapes: the sampler's argmax + log-normaliser (torch vs the C pass
in mux/csrc/sampling.c) over [B, 49152] logits, and a decoder step's elementwise ops (transformers' torch ops vs the
C passes of mux/csrc/layers.c the engine's layers call): the 61 RMSNorms (also `F.rms_norm`, which on the CPU is
the same ops composed: 0.94-1.44x at batch 64), 30 RoPEs of q [B, 9*64] and k [B, 3*64]. (SiLU(gate) * up in C was
measured 0.77x, 1.22x, 1.00x torch's at batch 1, 8, 64 and dropped.) Best of interleaved repetitions.
Run: python -m bench.step_ops
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from bench.common import best_time, machine, save
from mux.engine.sampler import _argmax_logsumexp
from mux.engine.torch_thread import TorchThread
from mux.model.cpu_layers import rms_norm, rope_

VOCAB, HIDDEN, NORMS, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 49152, 576, 61, 30, 9, 3, 64


def measure(batch: int) -> dict[str, float]:
    logits = torch.randn(batch, VOCAB) * 3
    hidden = torch.randn(batch, HIDDEN)
    plain = [LlamaRMSNorm(HIDDEN, eps=1e-5) for _ in range(NORMS)]
    weights = [n.weight for n in plain]
    q, k = torch.randn(batch, HEADS * HEAD_DIM), torch.randn(batch, KV_HEADS * HEAD_DIM)
    angles = torch.rand(batch, HEAD_DIM // 2) * 100
    cos, sin = (torch.cat([f(angles)] * 2, -1) for f in (torch.cos, torch.sin))  # [B, D]
    q4, k4 = (t.view(1, batch, -1, HEAD_DIM).transpose(1, 2) for t in (q, k))  # as transformers holds them
    ops = {
        "sampler torch": lambda: (logits.argmax(-1), torch.logsumexp(logits, -1)),
        "sampler C": lambda: _argmax_logsumexp(logits),
        "61 RMSNorms, transformers": lambda: [n(hidden) for n in plain],
        "61 RMSNorms, F.rms_norm": lambda: [F.rms_norm(hidden, (HIDDEN,), w, 1e-5) for w in weights],
        "61 RMSNorms, C": lambda: [rms_norm(n, hidden) for n in plain],
        "30 RoPEs, transformers": lambda: [apply_rotary_pos_emb(q4, k4, cos[None], sin[None]) for _ in range(LAYERS)],
        "30 RoPEs, C": lambda: [rope_(q, k, cos, sin, HEAD_DIM) for _ in range(LAYERS)],  # in place: values drift
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


PAIRS = (  # (what, the torch way, the C way)
    ("sampler", "sampler torch", "sampler C"),
    ("61 RMSNorms", "61 RMSNorms, transformers", "61 RMSNorms, C"),
    ("61 RMSNorms, F.rms_norm", "61 RMSNorms, transformers", "61 RMSNorms, F.rms_norm"),
    ("30 RoPEs", "30 RoPEs, transformers", "30 RoPEs, C"),
)


def main() -> None:
    results = TorchThread("bench").call(run)
    lines = [
        "# Per-step op levers (SmolLM2 shapes: vocabulary 49152, hidden 576, 30 layers, 61 RMSNorms per step)",
        "",
        "The engine's CPU float32 path uses the C passes (the sampler's, and mux/csrc/layers.c in the decoder",
        "layers); `F.rms_norm` is not adopted.",
        "",
        f"Machine: {json.dumps(machine())}",
        "",
        "µs per step, best of interleaved repetitions.",
        "",
        "| batch | ops | torch | other | speed-up |",
        "|---|---|---|---|---|",
    ]
    for batch, t in results.items():
        for what, slow, fast in PAIRS:
            lines.append(f"| {batch} | {what} | {t[slow]:.0f} | {t[fast]:.0f} | {t[slow] / t[fast]:.2f}× |")
    print("wrote", save("step-ops", {"machine": machine(), "us_per_step": results}, "\n".join(lines)))


if __name__ == "__main__":
    main()
