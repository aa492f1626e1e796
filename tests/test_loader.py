"""mux/model/loader.py: a model with a sliding attention window has its context capped at the window (mux's
attention attends over the whole context, which within the window is the same)."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, MistralConfig, Qwen2Config

from bench.common import tiny_config
from mux.config import ModelConfig
from mux.model.loader import load_base_model


def saved(tmp_path, config, smollm2_dir):
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(smollm2_dir).save_pretrained(tmp_path)
    return str(tmp_path)


def test_a_sliding_window_caps_the_context(tmp_path, smollm2_dir):
    mistral = tiny_config("mistral")
    mistral.sliding_window = 64
    assert isinstance(mistral, MistralConfig)
    assert load_base_model(ModelConfig(model=saved(tmp_path / "m", mistral, smollm2_dir))).max_model_len == 64
    fields = {k: v for k, v in tiny_config("qwen2").to_dict().items() if k != "layer_types"}
    qwen2 = Qwen2Config(**fields | {"use_sliding_window": True, "sliding_window": 96, "max_window_layers": 0})
    assert "sliding_attention" in qwen2.layer_types
    assert load_base_model(ModelConfig(model=saved(tmp_path / "q", qwen2, smollm2_dir))).max_model_len == 96


def test_models_without_one_keep_their_context(tmp_path, smollm2_dir):
    qwen2 = tiny_config("qwen2")  # sliding_window None
    assert load_base_model(ModelConfig(model=saved(tmp_path / "q", qwen2, smollm2_dir))).max_model_len == 512
    mistral = tiny_config("mistral")  # its default window (4096) is past the 512 positions
    assert load_base_model(ModelConfig(model=saved(tmp_path / "m", mistral, smollm2_dir))).max_model_len == 512
    capped = ModelConfig(model=saved(tmp_path / "m2", mistral, smollm2_dir), max_model_len=100)
    assert load_base_model(capped).max_model_len == 100
