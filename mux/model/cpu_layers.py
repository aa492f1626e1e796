"""CPU float32 decoder layers of the Llama family (Llama, Mistral, Qwen2) with their elementwise parts in C.

Besides its linears and attention, transformers' decoder layer runs ~25 small torch ops: two RMSNorms of ~7 ops,
RoPE (rotate_half's slices, cat and neg, four muls, two adds), SiLU and a mul, two residual adds; each is its own
pass over memory and its own parallel region. `fuse_layers` gives a model's decoder layers, their attention
modules and the final norm forwards that call `mux/csrc/layers.c` instead:

- each RMSNorm is one pass; the post-attention one also adds the attention output to the residual stream;
- RoPE runs in place on the q and k projections' outputs, then the attention function transformers would call.

`python -m bench.step_ops` at batch 64 (2026-12-04): 61 norms 1,764 → 448 µs, 30 RoPEs 1,874 → 181 µs; in the A
workload (64 × 64 tokens, 3 interleaved rounds) base-only 364 → 403 tok/s and 16 adapters 330 → 365 (medians),
greedy tokens identical. SiLU(gate) * up in C (a vector e^x and a division) was measured too and not adopted:
0.77×, 1.22×, 1.00× torch's two ops at batch 1, 8, 64.

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

from mux import native

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
    for module in model.modules():
        if count and type(module).__name__ in {f"{f}RMSNorm" for f in FAMILIES}:
            module.forward = types.MethodType(rms_norm, module)  # the final norm (the layers' call rms_norm)
    return count


def _fusable(layer: nn.Module, family: str) -> bool:
    norms = (getattr(layer, "input_layernorm", None), getattr(layer, "post_attention_layernorm", None))
    return type(getattr(layer, "self_attn", None)).__name__ == f"{family}Attention" and all(
        type(n).__name__ == f"{family}RMSNorm" for n in norms
    )


def rms_norm(norm: nn.Module, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """norm(x) for x [..., n]; with `residual`, x += residual first (x must then be a fresh tensor: it becomes
    the residual stream's sum)."""
    n = x.shape[-1]
    if not x.is_contiguous():
        x = x.contiguous()
    if residual is not None and not residual.is_contiguous():
        residual = residual.contiguous()
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
    h = rms_norm(self.post_attention_layernorm, a, residual=hidden_states)  # a (o_proj's fresh output) += residual
    return self.mlp(h).add_(a)


def _attention_forward(self, hidden_states, position_embeddings, attention_mask=None, cache=None, **kwargs):
    if cache is not None:
        return type(self).forward(self, hidden_states, position_embeddings, attention_mask, cache=cache, **kwargs)
    shape = (*hidden_states.shape[:-1], -1, self.head_dim)
    q = self.q_proj(hidden_states)  # [B, T, H*D] fresh outputs, rotated in place
    k = self.k_proj(hidden_states)  # [B, T, Hkv*D]
    v = self.v_proj(hidden_states)
    q, k = rope_(q, k, *position_embeddings, self.head_dim)
    if type(self).__name__ == "MistralAttention":
        window = {"sliding_window": getattr(self.config, "sliding_window", None)}
    else:
        window = {"sliding_window": self.sliding_window} if hasattr(self, "sliding_window") else {}
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
        **window,
        **kwargs,
    )
    return self.o_proj(out.reshape(*hidden_states.shape[:-1], -1).contiguous()), weights


def rope_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int):
    """q [..., T, H*D] and k [..., T, Hkv*D] rotated in place by cos/sin [..., T, D] (transformers' RoPE); a
    non-contiguous q or k is copied first. Returns (q, k)."""
    q, k, cos, sin = (t if t.is_contiguous() else t.contiguous() for t in (q, k, cos, sin))
    d = head_dim
    native.library().mux_rope(
        q.data_ptr(), q.shape[-1], q.shape[-1] // d, k.data_ptr(), k.shape[-1], k.shape[-1] // d,
        cos.data_ptr(), sin.data_ptr(), d, q.numel() // q.shape[-1], d,
    )  # fmt: skip
    return q, k
