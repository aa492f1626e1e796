"""CPU linears, applied to a plain model afterwards (gpt-fast style): each nn.Linear becomes a PackedLinear whose
weights are reordered once for the kernels that serve it, one kernel per row bucket, picked by measuring on this
machine (mux/model/linear_picks.py).

The kernels (`KERNELS`: each serves one weight format; `python -m bench.small_linear` times them side by side):
- "c": mux/csrc/linear.c over fp32 weights in panels of 16 output features (a stream at a few rows, a register-
  blocked GEMM at many); "c_bf16", "c_int8", "c_int4": the same kernel over bf16, int8 or int4 panels, each
  weight widened (and scaled) in registers, summing in fp32: 1/2, 1/4, 1/8 of the bytes of a memory-bound decode;
- "onednn": oneDNN's prepacked fp32 GEMM;
- "onednn_bf16": oneDNN's prepacked bf16 GEMM (AMX or AVX512-BF16 where the CPU has them): the input rounded to
  bf16, the output back to fp32;
- "torch_int8", "torch_int4": torch's weight-only int8 and int4 matmuls (`_weight_int8pack_mm`,
  `_weight_int4pack_mm_for_cpu`).
fp32 kernels give nn.Linear's result to rounding; bf16 ones serve bf16-rounded weights (`--dtype bfloat16`, or
`auto` where they measure faster); int8 and int4 ones the dequantized weights of a linear's `mux_quantized`
(mux/model/quant.py). Activations, LoRA deltas, attention and the KV cache stay fp32 in every case.
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from mux import native

_BATCH_HINT = 64  # oneDNN picks its blocking for this many rows; any row count works
PANEL = 16  # output features per panel of the C kernel's layout (mux/csrc/linear.c)
FEW_ROWS = 8  # up to this many rows a linear and its LoRA deltas are one C call (MAX_ROWS in mux/csrc/linear.c)
MAX_PICK_ROWS = 256  # the largest row bucket; larger calls take its kernel
KERNELS = {  # kernel -> the weight format it serves
    "c": "float32", "onednn": "float32", "c_bf16": "bfloat16", "onednn_bf16": "bfloat16",
    "c_int8": "int8", "torch_int8": "int8", "c_int4": "int4", "torch_int4": "int4",
}  # fmt: skip
C_FORMATS = {"c": 0, "c_bf16": 1, "c_int8": 2, "c_int4": 3}  # the C kernels' format codes (mux/csrc/linear.c)


class _Weights(ctypes.Structure):  # mux_weights of mux/csrc/linear.c
    _fields_ = [("data", ctypes.c_void_p), ("scales", ctypes.c_void_p), ("format", ctypes.c_int64),
                ("group", ctypes.c_int64)]  # fmt: skip


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
        weight = getattr(linear, "mux_quantized", None) or linear.weight.detach()  # [out, in]
        serves = ("float32", "bfloat16") if weight_format(linear) == "float32" else (weight_format(linear),)
        if bad := {k for k in picks.values() if KERNELS[k] not in serves}:
            raise ValueError(f"kernels {sorted(bad)} do not serve {weight_format(linear)} weights")
        self.group = getattr(weight, "group", 0)  # int4: input features per scale
        self.layouts = {kernel: _layout(kernel, weight) for kernel in sorted(set(picks.values()))}
        self._c = {k: _Weights(*_c_weights(k, t, weight)) for k, t in self.layouts.items() if k in C_FORMATS}

    @property
    def weight_format(self) -> str:
        return KERNELS[self._by_rows[-1]]

    @property
    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for ts in self.layouts.values() for t in ts)

    def kernel_for(self, rows: int) -> str:
        return self._by_rows[min(rows, MAX_PICK_ROWS)]

    def c_kernel(self, rows: int, fused: bool = False) -> tuple | None:
        """(the C function, the address of its weights' mux_weights) serving `rows` rows (`fused`: mux_linear_lora),
        or None where a oneDNN or torch kernel serves them."""
        kernel = self.kernel_for(rows)
        if kernel not in C_FORMATS:
            return None
        fn = native.library().mux_linear_lora if fused else native.library().mux_linear
        return fn, ctypes.addressof(self._c[kernel])

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [..., in] -> [..., out]
        if x.shape[-1] != self.in_features:  # the C kernels trust their shapes
            raise RuntimeError(f"linear: input width {x.shape[-1]}, expected {self.in_features}")
        rows = x.numel() // self.in_features
        kernel = self.kernel_for(rows)
        if kernel not in C_FORMATS:
            return self._torch(kernel, x)
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

    def _torch(self, kernel: str, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out] through a oneDNN or torch kernel."""
        layout = self.layouts[kernel]
        if kernel == "onednn":
            return torch.ops.mkldnn._linear_pointwise(x, layout[0], self.bias, "none", [], "")
        if kernel == "onednn_bf16":
            y = torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), layout[0], None, "none", [], "").float()
        else:
            x2 = x.reshape(-1, self.in_features).contiguous()
            if kernel == "torch_int8":
                y = torch._weight_int8pack_mm(x2, *layout)
            else:
                y = torch._weight_int4pack_mm_for_cpu(x2, layout[0], self.group, layout[1])
            y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y.add_(self.bias)


def weight_format(linear: nn.Module) -> str:
    """The format of a linear's weights before any kernel's choice: int8 or int4 where it was quantized, else
    float32 (bf16 is a kernel's choice over fp32 weights)."""
    quantized = getattr(linear, "mux_quantized", None)
    return "float32" if quantized is None else quantized.scheme


def _layout(kernel: str, weight) -> tuple[torch.Tensor, ...]:
    """The tensors `kernel` reads: weight is an fp32 tensor [out, in] or a QuantizedWeight (mux/model/quant.py)."""
    fmt = KERNELS[kernel]
    if fmt == "int8":
        if kernel == "torch_int8":
            return weight.q.contiguous(), weight.scale.float().contiguous()
        return pack_panels(weight.q), _pad_rows(weight.scale.float()[:, None]).view(-1)
    if fmt == "int4":
        d, m = weight.scale, weight.minimum  # [out, groups] fp16
        if kernel == "torch_int4":  # torch's int4: w = (q - 8) d + z
            sz = torch.stack([d.float(), m.float() + 8 * d.float()], dim=-1).transpose(0, 1).contiguous()
            return torch._convert_weight_to_int4pack_for_cpu(weight.q.int().contiguous(), 1), sz
        panels = pack_panels(weight.q)  # [np, in, 16] in 0..15: byte j holds features j and j + 8
        nibbles = (panels[..., :8] | (panels[..., 8:] << 4)).contiguous()
        groups = d.shape[1]
        dm = torch.stack([_pad_rows(d), _pad_rows(m)], dim=1)  # [np*16, 2, groups]
        dm = dm.view(-1, PANEL, 2, groups).permute(0, 3, 2, 1).contiguous()  # [np, groups, 2, 16]
        return nibbles, dm
    w = weight.to(torch.bfloat16 if fmt == "bfloat16" else torch.float32)
    if kernel in C_FORMATS:
        panels = pack_panels(w)
        return (panels.view(torch.int16) if w.dtype == torch.bfloat16 else panels,)
    return (torch.ops.mkldnn._reorder_linear_weight(w, _BATCH_HINT),)


def _c_weights(kernel: str, layout: tuple[torch.Tensor, ...], weight) -> tuple:
    """mux_weights' fields over a C kernel's layout."""
    scales = layout[1].data_ptr() if len(layout) > 1 else None
    group = weight.group if KERNELS[kernel] == "int4" else layout[0].shape[1]
    return layout[0].data_ptr(), scales, C_FORMATS[kernel], group


def _pad_rows(t: torch.Tensor) -> torch.Tensor:
    """t [out, ...] with zero rows up to a multiple of PANEL."""
    pad = -t.shape[0] % PANEL
    return t if not pad else torch.cat([t, t.new_zeros(pad, *t.shape[1:])])


def pack_panels(weight: torch.Tensor) -> torch.Tensor:
    """weight [out, in] -> [ceil(out/16), in, 16]: panel i holds output features 16i..16i+15 (zeros past out), each
    input feature's 16 weights side by side."""
    out, in_features = weight.shape
    if out % PANEL:  # a padded copy only where needed (a transient copy of the lm_head cost ≈110 MB of RSS)
        weight = torch.cat([weight, weight.new_zeros(PANEL - out % PANEL, in_features)])
    return weight.reshape(-1, PANEL, in_features).transpose(1, 2).contiguous()


def available_kernels() -> tuple[str, ...]:
    """The kernels this process can run: the C ones with the library built, the bf16 ones where oneDNN has bf16,
    torch's int8 and int4 ones."""
    names = ["onednn"] if torch.backends.mkldnn.is_available() else []
    if names and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        names.append("onednn_bf16")
    names += ["torch_int8", "torch_int4"]
    if native.library() is not None:
        names += list(C_FORMATS)
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
