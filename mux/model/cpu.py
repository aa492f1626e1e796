"""CPU tuning, applied to a plain model afterwards (gpt-fast style): prepacked linears, allocator settings.

- PackedLinear: fp32 weights reordered once for the CPU. With the C kernels (`mux/csrc/linear.c`, given as
  `kernel`): in panels of 16 output features, which the kernel reads as one stream at a few rows and as a GEMM at
  many: 1.1-1.5x oneDNN's prepacked GEMM from 1 to 64 rows on this 2-core machine, as fast at 256
  (`python -m bench.small_linear`). Without them: oneDNN's blocked layout (measured at M=64 decode rows: 576→1536
  went from 130 to 190 GFLOP/s against torch's own linear, the 49152-wide lm_head from 66 to 182 GFLOP/s;
  prefill shapes gain ≈1.5×). Either way one copy of the weights: the model's own are let go.
- keep_freed_memory: glibc returns large freed blocks to the OS and page-faults them back on the next step;
  keeping them cut a 1920-token SmolLM2 prefill from 3.8 s to 2.5 s.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

_BATCH_HINT = 64  # oneDNN picks its blocking for this many rows; any row count works
PANEL = 16  # output features per panel of the C kernel's layout (mux/csrc/linear.c)
FEW_ROWS = 8  # up to this many rows a linear and its LoRA deltas are one C call (mux_linear_lora's limit)


class PackedLinear(nn.Module):
    def __init__(self, linear: nn.Linear, kernel: Callable | None = None) -> None:
        """`kernel`: the C kernel `mux_linear`, over the weights packed in panels; None: oneDNN's prepacked GEMM."""
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        weight = linear.weight.detach()  # [out, in]
        self.bias = None if linear.bias is None else linear.bias.detach().contiguous()
        self.kernel = kernel
        self.panels = pack_panels(weight) if kernel is not None else None  # [ceil(out/16), in, 16]
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, _BATCH_HINT) if kernel is None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [..., in] -> [..., out]
        if self.kernel is None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        if x.shape[-1] != self.in_features:  # the kernel trusts its shapes
            raise RuntimeError(f"linear: input width {x.shape[-1]}, expected {self.in_features}")
        x = x.contiguous()
        y = x.new_empty(*x.shape[:-1], self.out_features)  # [..., out]
        if rows := x.numel() // self.in_features:
            bias = None if self.bias is None else self.bias.data_ptr()
            k, n = self.in_features, self.out_features
            self.kernel(x.data_ptr(), k, y.data_ptr(), n, self.panels.data_ptr(), bias, rows, k, n)
        return y


def pack_panels(weight: torch.Tensor) -> torch.Tensor:
    """weight [out, in] -> [ceil(out/16), in, 16]: panel i holds output features 16i..16i+15 (zeros past out), each
    input feature's 16 weights side by side."""
    out, in_features = weight.shape
    if out % PANEL:  # a padded copy only where needed (a transient copy of the lm_head cost ≈110 MB of RSS)
        weight = torch.cat([weight, weight.new_zeros(PANEL - out % PANEL, in_features)])
    return weight.reshape(-1, PANEL, in_features).transpose(1, 2).contiguous()


def can_pack(model: nn.Module) -> bool:
    p = next(model.parameters())
    return p.device.type == "cpu" and p.dtype == torch.float32 and torch.backends.mkldnn.is_available()


def pack_linears(model: nn.Module, kernel: Callable | None = None) -> int:
    """Replace every nn.Linear in `model` (including ones wrapped by LoRA layers) by a PackedLinear (`kernel`: see
    PackedLinear)."""
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, PackedLinear(getattr(owner, child), kernel))
    return len(names)
