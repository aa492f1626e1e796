"""mux/model/cuda.py on the CPU: the fused RMSNorm computes what transformers' Llama-family norms compute, and the
swap replaces exactly those (the engine applies it on CUDA only)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.mistral.modeling_mistral import MistralRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

from mux.model.cuda import FusedRMSNorm, fuse_rms_norms


@pytest.mark.parametrize("cls", [LlamaRMSNorm, MistralRMSNorm, Qwen2RMSNorm, Qwen3RMSNorm])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fused_norm_equals_transformers(cls, dtype):
    g = torch.Generator().manual_seed(0)
    norm = cls(96, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(96, generator=g))
    norm = norm.to(dtype)
    x = (torch.randn(3, 7, 96, generator=g) * 4).to(dtype)
    want, got = norm(x), FusedRMSNorm(norm)(x)
    assert got.dtype == want.dtype and got.shape == want.shape
    tol = 1e-6 if dtype == torch.float32 else 2e-2  # half: one rounding of the product vs two (HF casts, then scales)
    assert torch.allclose(got.float(), want.float(), rtol=tol, atol=tol)


class GemmaRMSNorm(nn.Module):  # weight * (1 + w) style norms must keep their own forward
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(8))
        self.variance_epsilon = 1e-6


def test_swap_replaces_the_llama_norms_only_and_keeps_the_logits(tiny_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    model.extra = GemmaRMSNorm()
    ids = torch.tensor([[5, 17, 300, 42, 7]])
    weight = model.model.norm.weight
    with torch.no_grad():
        want = model(ids).logits
        layers = model.config.num_hidden_layers
        assert fuse_rms_norms(model) == 2 * layers + 1  # two per decoder layer and the final norm
        assert fuse_rms_norms(model) == 0  # already swapped
        got = model(ids).logits
    assert isinstance(model.model.norm, FusedRMSNorm) and isinstance(model.extra, GemmaRMSNorm)
    assert model.model.norm.weight is weight  # shared, not copied
    assert torch.allclose(got, want, atol=1e-5)
