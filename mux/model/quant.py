"""Weight-only quantization of the decoder layers' linears (`--quantization int8 | int4`): the schemes, and the
embedded GGUF's own 4-bit tensors read as they are.

- int8: symmetric, one scale per output feature: s = max|W_row| / 127, q = round(W / s) clamped to ±127, w = q s.
- int4: asymmetric, one fp16 scale d and minimum m per output feature and group of GROUP = 32 input features
  (llama.cpp's Q4_1): d = (max - min) / 15, q = round((W - m) / d) clamped to 0..15, w = q d + m, d and m rounded
  to fp16 first; 0.625 bytes a weight (0.156× of fp32). Groups of 64 would take 0.14×, but on SmolLM2 they raised
  the perplexity of `python -m bench.quantization`'s text from 27.1 to 42.9 (groups of 32: 27.1).
- GGUF Q4_1 tensors (SmolLM2's file holds every decoder linear so) are the int4 scheme: they are served as they
  are, without going through fp32. Other GGUF types are dequantized by transformers at conversion.

The lm_head and the embeddings stay unquantized. Every kernel that serves a quantized linear computes with the
dequantized weights (`QuantizedWeight.dequantize`): the reference PEFT is compared with.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mux.errors import MuxError

SCHEMES = ("none", "int8", "int4")
GROUP = 32  # input features per int4 scale and minimum: Q4_1's block
_GGUF_LINEARS = {  # GGUF tensor name (after blk.N.) -> the HF module under model.layers.N
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class QuantizedWeight:
    """A linear's weight [out, in] as integers and scales. int8: q int8 [out, in], scale fp32 [out]. int4: q uint8
    [out, in] in 0..15, scale and minimum fp16 [out, in / group]."""

    scheme: str
    q: torch.Tensor
    scale: torch.Tensor
    minimum: torch.Tensor | None = None
    group: int = 0

    def dequantize(self) -> torch.Tensor:  # -> fp32 [out, in]
        if self.scheme == "int8":
            return self.q.float() * self.scale[:, None]
        out, n = self.q.shape
        q = self.q.float().view(out, n // self.group, self.group)
        return (q * self.scale.float()[..., None] + self.minimum.float()[..., None]).view(out, n)

    @property
    def nbytes(self) -> int:
        """The bytes this scheme stores (int4: two weights a byte)."""
        q = self.q.numel() // 2 if self.scheme == "int4" else self.q.numel()
        return q + sum(t.numel() * t.element_size() for t in (self.scale, self.minimum) if t is not None)


def quantize(weight: torch.Tensor, scheme: str, group: int = GROUP) -> QuantizedWeight:
    """weight [out, in] fp32 -> its int8 or int4 form (the schemes of this module's docstring)."""
    w = weight.detach().float()
    if scheme == "int8":
        scale = w.abs().amax(dim=1) / 127
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row: any scale, q = 0
        q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
        return QuantizedWeight("int8", q, scale)
    out, n = w.shape
    g = w.view(out, n // group, group)
    lo, hi = g.amin(dim=2), g.amax(dim=2)
    d = ((hi - lo) / 15).half()
    m = lo.half()
    d = torch.where(d.float() > 0, d, torch.ones_like(d))  # a constant group: q = 0 gives m
    q = torch.round((g - m.float()[..., None]) / d.float()[..., None]).clamp_(0, 15).to(torch.uint8)
    return QuantizedWeight("int4", q.view(out, n), d, m, group)


def check(model: nn.Module, scheme: str, group: int = GROUP) -> list[nn.Linear]:
    """The linears `scheme` quantizes: every nn.Linear of the decoder layers. A shape the scheme cannot hold (int4:
    input features not a multiple of the group) is a MuxError naming it, before anything changes."""
    if scheme not in SCHEMES:
        raise MuxError(f"unknown quantization {scheme!r} (one of {', '.join(SCHEMES)})")
    if scheme == "none":
        return []
    found = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear and re.search(r"\.layers\.\d+\.", n)]
    if not found:
        raise MuxError("--quantization: the model has no decoder-layer linears (model.layers.N.*) to quantize")
    for name, linear in found:
        if scheme == "int4" and linear.in_features % group:
            raise MuxError(f"--quantization int4: {name} has {linear.in_features} input features, not a multiple "
                           f"of the group size {group}")  # fmt: skip
    return [m for _, m in found]


def quantize_model(model: nn.Module, scheme: str, gguf: Path | None = None) -> int:
    """Quantize the decoder layers' linears of `model` (fp32 on the CPU) in place: each keeps its QuantizedWeight
    as `mux_quantized` (the packed linears are built from it, mux/model/cpu.py) and its weight becomes the
    dequantized one. With `gguf` (the file the model was converted from) and int4, its Q4_1 tensors are taken as
    they are. Returns the weight bytes of the quantized linears."""
    targets = check(model, scheme)
    from_file = _gguf_q4_1(gguf, model) if gguf is not None and scheme == "int4" else {}
    total = 0
    for linear in targets:
        qw = from_file.get(id(linear)) or quantize(linear.weight, scheme)
        linear.weight.data = qw.dequantize()
        linear.mux_quantized = qw
        total += qw.nbytes
    return total


def _gguf_q4_1(path: Path, model: nn.Module) -> dict[int, QuantizedWeight]:
    """id(linear) -> its Q4_1 tensor of the GGUF file as an int4 QuantizedWeight (group 32), for the tensors whose
    type is Q4_1; q_proj and k_proj rows un-permuted as transformers does (llama.cpp stores them reordered for its
    RoPE)."""
    from gguf import GGMLQuantizationType, GGUFReader

    reader = GGUFReader(path)
    config = model.config
    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", config.num_attention_heads)
    found = {}
    for tensor in reader.tensors:
        parts = tensor.name.split(".")
        if tensor.tensor_type != GGMLQuantizationType.Q4_1 or parts[0] != "blk" or parts[2] not in _GGUF_LINEARS:
            continue
        linear = model.get_submodule(f"model.layers.{parts[1]}.{_GGUF_LINEARS[parts[2]]}")
        out, n = linear.out_features, linear.in_features
        blocks = np.asarray(tensor.data).reshape(out, n // GROUP, 20)  # d fp16, m fp16, 16 bytes of nibbles
        d = torch.from_numpy(blocks[..., 0:2].copy().view(np.float16)[..., 0])
        m = torch.from_numpy(blocks[..., 2:4].copy().view(np.float16)[..., 0])
        nib = torch.from_numpy(blocks[..., 4:].copy())  # element j: byte j's low nibble, element j + 16: its high
        q = torch.cat([nib & 15, nib >> 4], dim=-1).view(out, n)
        if parts[2] in ("attn_q", "attn_k"):
            order = _unpermute(out, heads if parts[2] == "attn_q" else kv_heads)
            q, d, m = q[order], d[order], m[order]
        found[id(linear)] = QuantizedWeight("int4", q.contiguous(), d.contiguous(), m.contiguous(), GROUP)
    return found


def _unpermute(rows: int, heads: int) -> torch.Tensor:
    """The row order transformers' GGUF loader gives q_proj / k_proj (its _reverse_permute_weights)."""
    dim = rows // heads // 2
    return torch.arange(rows).view(heads, dim, 2).transpose(1, 2).reshape(rows)
