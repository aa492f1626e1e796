"""CPU float32 decoder layers of the Llama family (Llama, Mistral, Qwen2) with their elementwise parts in C.

Besides its linears and attention, transformers' decoder layer runs ~25 small torch ops: two RMSNorms of ~7 ops,
RoPE (rotate_half's slices, cat and neg, four muls, two adds), SiLU and a mul, two residual adds; each is its own
pass over memory and its own parallel region. `fuse_layers` gives a model's decoder layers, their attention
modules and the final norm forwards that call `mux/csrc/layers.c` instead:

- each RMSNorm is one pass; the post-attention one also adds the attention output to the residual stream;
- RoPE runs in place on the q and k projections' outputs, then the attention function transformers would call.

`python -m bench.step_ops` at batch 64 (2026-12-04/05): 61 norms 1,685 → 446 µs, 30 RoPEs 1,908 → 182 µs (207
with the shape checks). In the A workload (`python -m bench.throughput --levers --repeat 3`, beside
the layers forced to torch's): 1.08× of the best runs, 1.13× the median of rounds (1.05× in a 2-round suite run); greedy
tokens identical (ad hoc). SiLU(gate) * up in C (a vector e^x and a division) was measured too and not adopted:
0.77×, 1.22×, 1.00× torch's two ops at batch 1, 8, 64.

On CUDA the attention forward alone is given (`fuse_rope`, when the Triton kernels serve): RoPE in place is one
Triton kernel (`mux/triton_ops.py`) where transformers runs ten small ones a layer; the CUDA norms are
mux/model/cuda.py's.

Only those module instances change (a benchmark's HF and PEFT baselines in the same process keep transformers'
code). Same formulas: RoPE equals transformers' bit for bit; the norms differ in the last bits (the order of the sum
of squares). An attention module given a KV cache (transformers' own generation) falls back to transformers'
forward.
"""

from __future__ import annotations

import sys
import types

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from mux import native, triton_ops

FAMILIES = ("Llama", "Mistral", "Qwen2")  # decoder layers, attention and MLPs with the same forward (read in 5.25)


def fuse_layers(model: nn.Module) -> int:
    """Give each Llama-family decoder layer of `model` (and the final norm) the C forwards; returns how many
    layers. Layers of other families keep transformers' forward."""
    count = 0
    for module in model.modules():
        family = next((f for f in FAMILIES if type(module).__name__ == f"{f}DecoderLayer"), None)
        if family is None or not _fusable(module, family):
            continue
        module.forward = types.MethodType(_layer_forward, module)
        module.self_attn.forward = types.MethodType(_attention_forward, module.self_attn)
        count += 1
    norms = {f"{f}RMSNorm" for f in FAMILIES}
    for module in model.modules() if count else ():
        if type(module).__name__ in norms:
            module.forward = types.MethodType(rms_norm, module)  # for the final norm (the layers call rms_norm)
    return count


def fuse_rope(model: nn.Module) -> int:
    """Give each Llama-family attention module of `model` the forward that rotates q and k in place (`rope_`);
    returns how many. For CUDA, where the rest of the layer keeps transformers' forward."""
    count = 0
    for module in model.modules():
        family = next((f for f in FAMILIES if type(module).__name__ == f"{f}DecoderLayer"), None)
        if family is not None and type(getattr(module, "self_attn", None)).__name__ == f"{family}Attention":
            module.self_attn.forward = types.MethodType(_attention_forward, module.self_attn)
            count += 1
    return count


def is_fused(layer: nn.Module) -> bool:
    """Whether `fuse_layers` gave this decoder layer its C forwards."""
    return getattr(layer.forward, "__func__", None) is _layer_forward


def _fusable(layer: nn.Module, family: str) -> bool:
    norms = (getattr(layer, "input_layernorm", None), getattr(layer, "post_attention_layernorm", None))
    return type(getattr(layer, "self_attn", None)).__name__ == f"{family}Attention" and all(
        type(n).__name__ == f"{family}RMSNorm" for n in norms
    )


def rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """norm(x) for x [..., n]."""
    return _rms_norm(norm, x if x.is_contiguous() else x.contiguous(), None)


def add_rms_norm_(norm: nn.Module, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + residual, norm(x + residual)) in one pass, the sum written into x (a non-contiguous x is copied
    first; the sum is the first tensor returned either way)."""
    x = x if x.is_contiguous() else x.contiguous()
    residual = residual if residual.is_contiguous() else residual.contiguous()
    if residual.shape != x.shape:
        raise ValueError(f"residual {tuple(residual.shape)} for x {tuple(x.shape)}")
    return x, _rms_norm(norm, x, residual)


def _rms_norm(norm: nn.Module, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    n = x.shape[-1]
    out = torch.empty_like(x)
    native.library().mux_rms_norm(
        x.data_ptr(), n, None if residual is None else residual.data_ptr(), n, norm.weight.data_ptr(),
        out.data_ptr(), n, x.numel() // n, n, norm.variance_epsilon,
    )  # fmt: skip
    return out


def _layer_forward(self, hidden_states, attention_mask=None, position_embeddings=None, **kwargs) -> torch.Tensor:
    h = rms_norm(self.input_layernorm, hidden_states)
    a, _ = self.self_attn(
        hidden_states=h, attention_mask=attention_mask, position_embeddings=position_embeddings, **kwargs
    )
    residual, h = add_rms_norm_(self.post_attention_layernorm, a, hidden_states)  # into o_proj's fresh output
    return self.mlp(h).add_(residual)


def _attention_forward(self, hidden_states, position_embeddings, attention_mask=None, cache=None, **kwargs):
    if cache is not None:
        return type(self).forward(self, hidden_states, position_embeddings, attention_mask, cache=cache, **kwargs)
    shape = (*hidden_states.shape[:-1], -1, self.head_dim)
    q = self.q_proj(hidden_states)  # [B, T, H*D] fresh outputs, rotated in place
    k = self.k_proj(hidden_states)  # [B, T, Hkv*D]
    v = self.v_proj(hidden_states)
    q, k = rope_(q, k, *position_embeddings, self.head_dim)
    window = getattr(self, "sliding_window", getattr(self.config, "sliding_window", None))  # as Qwen2's, Mistral's
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(
        self.config._attn_implementation, sys.modules[type(self).__module__].eager_attention_forward
    )
    out, weights = attention(
        self,
        q.view(shape).transpose(1, 2),  # [B, H, T, D]
        k.view(shape).transpose(1, 2),
        v.view(shape).transpose(1, 2),
        attention_mask,
        dropout=0.0,
        scaling=self.scaling,
        sliding_window=window,
        **kwargs,
    )
    return self.o_proj(out.reshape(*hidden_states.shape[:-1], -1).contiguous()), weights


def rope_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int):
    """q [B, T, H*D] and k [B, T, Hkv*D] rotated in place by cos/sin [B or 1, T, D] (transformers' RoPE: its
    cos/sin broadcast over the batch when the positions do); a non-contiguous q or k is copied first. Returns
    (q, k)."""
    d = head_dim
    if q.shape[:-1] != k.shape[:-1] or q.shape[-1] % d or k.shape[-1] % d:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} for head size {d}")
    rows = q.numel() // q.shape[-1]
    if cos.numel() != rows * d:  # broadcast: a copy per row (the engine's batch of 1 never needs one)
        cos, sin = (t.expand(*q.shape[:-1], d).contiguous() for t in (cos, sin))
    q, k, cos, sin = (t if t.is_contiguous() else t.contiguous() for t in (q, k, cos, sin))
    if q.is_cuda:
        return triton_ops.rope_(q, k, cos, sin, d)
    native.library().mux_rope(
        q.data_ptr(), q.shape[-1], q.shape[-1] // d, k.data_ptr(), k.shape[-1], k.shape[-1] // d,
        cos.data_ptr(), sin.data_ptr(), d, rows, d,
    )  # fmt: skip
    return q, k
