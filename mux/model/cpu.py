"""CPU linears, applied to a plain model afterwards (gpt-fast style): each nn.Linear becomes a PackedLinear whose
weights are reordered once for the kernels that serve it, one kernel per row bucket, picked by measuring on this
machine (mux/model/linear_picks.py).

The kernels (`KERNELS`; `python -m bench.small_linear` times them side by side):
- "c": mux/csrc/linear.c over fp32 weights in panels of 16 output features (a stream at a few rows, a register-
  blocked GEMM at many);
- "c_bf16": the same kernel over bf16 panels, summing in fp32: half the bytes of a memory-bound decode;
- "onednn": oneDNN's prepacked fp32 GEMM;
- "onednn_bf16": oneDNN's prepacked bf16 GEMM (AMX or AVX512-BF16 where the CPU has them): the input rounded to
  bf16, the output back to fp32.
fp32 kernels give nn.Linear's result to rounding; bf16 ones serve bf16-rounded weights (`--dtype bfloat16`, or
`auto` where they measure faster). Activations, LoRA deltas, attention and the KV cache stay fp32 either way.
"""

from __future__ import annotations

import torch
from torch import nn

from mux import native

_BATCH_HINT = 64  # oneDNN picks its blocking for this many rows; any row count works
PANEL = 16  # output features per panel of the C kernel's layout (mux/csrc/linear.c)
FEW_ROWS = 8  # up to this many rows a linear and its LoRA deltas are one C call (MAX_ROWS in mux/csrc/linear.c)
MAX_PICK_ROWS = 256  # the largest row bucket; larger calls take its kernel
KERNELS = {"c": torch.float32, "onednn": torch.float32, "c_bf16": torch.bfloat16, "onednn_bf16": torch.bfloat16}
C_KERNELS = {"c": ("mux_linear", "mux_linear_lora"), "c_bf16": ("mux_linear_bf16", "mux_linear_lora_bf16")}


class PackedLinear(nn.Module):
    def __init__(self, linear: nn.Linear, picks: dict[int, str] | str) -> None:
        """picks: row bucket -> kernel name (mux/runtime/picks.py's buckets), or one kernel for every row count.
        Only the layouts the picks name are kept; the linear's own weight is let go."""
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.bias = None if linear.bias is None else linear.bias.detach().float().contiguous()
        picks = {MAX_PICK_ROWS: picks} if isinstance(picks, str) else dict(picks)
        if unknown := set(picks.values()) - set(KERNELS):
            raise ValueError(f"unknown linear kernels {sorted(unknown)} (known: {sorted(KERNELS)})")
        self.picks = picks
        buckets = sorted(picks)
        self._by_rows = [picks[next((b for b in buckets if r <= b), buckets[-1])] for r in range(MAX_PICK_ROWS + 1)]
        weight = linear.weight.detach()  # [out, in]
        self.layouts = {kernel: _layout(kernel, weight) for kernel in sorted(set(picks.values()))}
        self._c = {k: getattr(native.library(), C_KERNELS[k][0]) for k in self.layouts if k in C_KERNELS}

    @property
    def weight_dtype(self) -> torch.dtype:
        return KERNELS[self._by_rows[-1]]

    @property
    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.layouts.values())

    def kernel_for(self, rows: int) -> str:
        return self._by_rows[min(rows, MAX_PICK_ROWS)]

    def c_kernel(self, rows: int, fused: bool = False) -> tuple | None:
        """(the C function, its panels' address) serving `rows` rows (`fused`: mux_linear_lora's form), or None
        where a oneDNN kernel serves them."""
        kernel = self.kernel_for(rows)
        if kernel not in C_KERNELS:
            return None
        fn = getattr(native.library(), C_KERNELS[kernel][1]) if fused else self._c[kernel]
        return fn, self.layouts[kernel].data_ptr()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [..., in] -> [..., out]
        if x.shape[-1] != self.in_features:  # the C kernels trust their shapes
            raise RuntimeError(f"linear: input width {x.shape[-1]}, expected {self.in_features}")
        rows = x.numel() // self.in_features
        kernel = self.kernel_for(rows)
        if kernel == "onednn":
            return torch.ops.mkldnn._linear_pointwise(x, self.layouts[kernel], self.bias, "none", [], "")
        if kernel == "onednn_bf16":
            y = torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), self.layouts[kernel], None, "none", [], "")
            y = y.float()
            return y if self.bias is None else y.add_(self.bias)
        x = x.contiguous()
        y = x.new_empty(*x.shape[:-1], self.out_features)  # [..., out]
        if rows:
            self.into(x, y, rows)
        return y

    def into(self, x: torch.Tensor, y: torch.Tensor, rows: int) -> None:
        """y [rows, out] = x [rows, in] Wᵀ (+ bias), both contiguous: the C kernels write in place, oneDNN's result is
        copied in."""
        c = self.c_kernel(rows)
        if c is None:
            y.copy_(self.forward(x))
            return
        fn, panels = c
        bias = None if self.bias is None else self.bias.data_ptr()
        k, n = self.in_features, self.out_features
        fn(x.data_ptr(), k, y.data_ptr(), n, panels, bias, rows, k, n)


def _layout(kernel: str, weight: torch.Tensor) -> torch.Tensor:
    w = weight.to(KERNELS[kernel])
    if kernel in C_KERNELS:
        panels = pack_panels(w)
        return panels.view(torch.int16) if w.dtype == torch.bfloat16 else panels
    return torch.ops.mkldnn._reorder_linear_weight(w, _BATCH_HINT)


def pack_panels(weight: torch.Tensor) -> torch.Tensor:
    """weight [out, in] -> [ceil(out/16), in, 16]: panel i holds output features 16i..16i+15 (zeros past out), each
    input feature's 16 weights side by side."""
    out, in_features = weight.shape
    if out % PANEL:  # a padded copy only where needed (a transient copy of the lm_head cost ≈110 MB of RSS)
        weight = torch.cat([weight, weight.new_zeros(PANEL - out % PANEL, in_features)])
    return weight.reshape(-1, PANEL, in_features).transpose(1, 2).contiguous()


def available_kernels() -> tuple[str, ...]:
    """The kernels this process can run: the C ones with the library built, the bf16 ones where oneDNN has bf16."""
    names = ["onednn"] if torch.backends.mkldnn.is_available() else []
    if names and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        names.append("onednn_bf16")
    if native.library() is not None:
        names += ["c", "c_bf16"]
    return tuple(names)


def can_pack(model: nn.Module) -> bool:
    p = next(model.parameters())
    return p.device.type == "cpu" and p.dtype == torch.float32 and bool(available_kernels())


def linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every plain nn.Linear of `model` (including ones wrapped by LoRA layers), by name."""
    return {n: m for n, m in model.named_modules() if type(m) is nn.Linear}


def pack_linears(model: nn.Module, picks) -> int:
    """Replace every nn.Linear in `model` by a PackedLinear; picks(linear) gives its PackedLinear picks."""
    names = list(linears(model))
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        linear = getattr(owner, child)
        setattr(owner, child, PackedLinear(linear, picks(linear)))
    return len(names)
