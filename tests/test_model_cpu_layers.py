"""mux/model/cpu_layers.py: the C forwards of Llama-family decoder layers compute what transformers' compute (RoPE
bit for bit), change only the model they are applied to, and leave other families alone."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from bench.common import tiny_config
from mux.model.cpu_layers import add_rms_norm_, fuse_layers, fuse_rope, rms_norm, rope_

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")


def tiny(family: str, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    config = tiny_config(family, vocab_size=512)
    for key, value in overrides.items():
        setattr(config, key, value)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2) if p.dim() == 2 else p.uniform_(0.5, 1.5)  # norm weights away from 1 too
    return model


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_fused_layers_give_transformers_logits_and_tokens(family):
    plain = tiny(family)
    fused = copy.deepcopy(plain)
    assert fuse_layers(fused) == plain.config.num_hidden_layers
    ids = torch.randint(0, 512, (3, 37), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():  # no KV cache: with one, the attention is transformers' (the next test)
        want, got = plain(ids, use_cache=False).logits, fused(ids, use_cache=False).logits  # [3, 37, V], SDPA
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-4 * want.abs().max().item())
    assert torch.equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_the_attention_forward_alone_in_transformers_layers(family):
    """`fuse_rope` (the CUDA path: the attention forward with RoPE in place, transformers' layers otherwise; here
    with the C RoPE, on CUDA the Triton one of the same contract) keeps transformers' logits."""
    plain = tiny(family)
    fused = copy.deepcopy(plain)
    assert fuse_rope(fused) == plain.config.num_hidden_layers
    ids = torch.randint(0, 512, (3, 37), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want, got = plain(ids, use_cache=False).logits, fused(ids, use_cache=False).logits  # [3, 37, V]
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_generation_with_a_kv_cache_takes_transformers_attention():
    plain = tiny("llama")
    fused = copy.deepcopy(plain)
    fuse_layers(fused)
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(2))
    cfg = GenerationConfig(max_new_tokens=8, do_sample=False, pad_token_id=2)
    with torch.inference_mode():
        assert torch.equal(fused.generate(ids, generation_config=cfg), plain.generate(ids, generation_config=cfg))


def test_rope_equals_transformers_bit_for_bit():
    g = torch.Generator().manual_seed(3)
    model = tiny("llama")
    pos = torch.arange(100, 111)[None]
    cos, sin = model.model.rotary_emb(torch.zeros(1), pos)  # [1, 11, 16]
    q, k = torch.randn(1, 11, 4 * 16, generator=g) * 5, torch.randn(1, 11, 2 * 16, generator=g) * 5
    want_q, want_k = apply_rotary_pos_emb(
        q.view(1, 11, 4, 16).transpose(1, 2), k.view(1, 11, 2, 16).transpose(1, 2), cos, sin
    )  # [1, H, 11, 16]
    got_q, got_k = rope_(q, k, cos, sin, 16)
    assert got_q is q and got_k is k  # in place
    assert torch.equal(q.view(1, 11, 4, 16).transpose(1, 2), want_q)
    assert torch.equal(k.view(1, 11, 2, 16).transpose(1, 2), want_k)
    odd = torch.randn(2, 3 * 6, generator=g)  # head size 6: halves of 3, no vector lanes
    c6, s6 = model.model.rotary_emb(torch.zeros(1), torch.arange(2)[None])
    c6, s6 = c6[0, :, :6].contiguous(), s6[0, :, :6].contiguous()
    want6 = apply_rotary_pos_emb(odd.view(2, 3, 6).transpose(0, 1), odd.view(2, 3, 6).transpose(0, 1), c6, s6, 0)[0]
    rope_(odd, torch.zeros(2, 0), c6, s6, 6)
    assert torch.equal(odd.view(2, 3, 6).transpose(0, 1), want6)
    batched = torch.randn(2, 11, 4 * 16, generator=g)  # cos/sin [1, T, D] broadcast over a batch of 2
    want_b = apply_rotary_pos_emb(
        batched.view(2, 11, 4, 16).transpose(1, 2), batched.view(2, 11, 4, 16).transpose(1, 2), cos, sin
    )[0]
    rope_(batched, torch.zeros(2, 11, 0), cos, sin, 16)
    assert torch.equal(batched.view(2, 11, 4, 16).transpose(1, 2), want_b)
    for bad_q, bad_k in (
        (torch.zeros(1, 11, 60), torch.zeros(1, 11, 32)),
        (torch.zeros(1, 11, 64), torch.zeros(1, 9, 32)),
    ):
        with pytest.raises(ValueError):
            rope_(bad_q, bad_k, cos, sin, 16)


def test_rms_norm_with_the_residual_add():
    g = torch.Generator().manual_seed(4)
    norm = LlamaRMSNorm(200, eps=1e-5)  # 200: vector lanes and a scalar tail
    with torch.no_grad():
        norm.weight.copy_(torch.randn(200, generator=g))
    x, residual = torch.randn(5, 3, 200, generator=g) * 3, torch.randn(5, 3, 200, generator=g)
    total = x + residual
    want = norm(total)
    summed, got = add_rms_norm_(norm, x, residual)
    assert summed is x and torch.equal(x, total)  # the sum is left in x: the residual stream
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-6)
    xt, rt = torch.randn(200, 4, generator=g).T, torch.randn(4, 200, generator=g)  # a strided x: a copy holds the sum
    summed, got = add_rms_norm_(norm, xt, rt)
    assert torch.equal(summed, xt + rt) and torch.allclose(got, norm(xt + rt), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError):
        add_rms_norm_(norm, torch.randn(3, 200), torch.randn(200))
    assert torch.allclose(rms_norm(norm, residual), norm(residual), rtol=1e-6, atol=1e-6)
    strided = torch.randn(200, 4, generator=g).T  # a non-contiguous input is read, not written
    assert torch.allclose(rms_norm(norm, strided), norm(strided), rtol=1e-6, atol=1e-6)


def test_other_families_keep_transformers_forwards():
    from transformers import Qwen3Config

    qwen3 = AutoModelForCausalLM.from_config(
        Qwen3Config(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=512,
        )
    )  # fmt: skip
    assert fuse_layers(qwen3) == 0  # its attention normalises q and k before RoPE
    layer = qwen3.model.layers[0]
    assert all("forward" not in vars(m) for m in (layer, layer.self_attn, qwen3.model.norm))
    plain = tiny("llama")
    fuse_layers(copy.deepcopy(plain))
    assert "forward" not in vars(plain.model.layers[0])  # only the model it was applied to
