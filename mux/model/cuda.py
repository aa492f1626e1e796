"""CUDA tuning, applied to a plain model afterwards (as mux/model/cpu.py is on the CPU): the RMSNorms as one kernel.

HF's Llama-family RMSNorm is ~7 small kernels a call (to fp32, pow, mean, add, rsqrt, mul, cast, mul by the
weight); a Llama-7B decode step has 65 of them. `torch.nn.functional.rms_norm` on CUDA is one fused kernel
(`aten::_fused_rms_norm`) with the same formula, accumulating in fp32. Unmeasured on a GPU when written
(2026-12-04, a session without one): `bench/gpu_check.py` times both (`kernel_ms`). On the CPU `F.rms_norm` is
the same ops composed (0.94-1.44x at batch 64, `python -m bench.step_ops`); the C pass of mux/model/cpu_layers.py
serves there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# The norms computing weight * (x / rms(x)) with the weight as stored (Gemma's (1 + weight) is not one of them)
LLAMA_NORMS = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"})


class FusedRMSNorm(nn.Module):
    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.weight = norm.weight
        self.eps = norm.variance_epsilon

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [..., hidden]
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


def fuse_rms_norms(model: nn.Module) -> int:
    """Replace every Llama-family RMSNorm in `model` by a FusedRMSNorm sharing its weight; returns how many."""
    names = [n for n, m in model.named_modules() if type(m).__name__ in LLAMA_NORMS]
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, FusedRMSNorm(getattr(owner, child)))
    return len(names)
