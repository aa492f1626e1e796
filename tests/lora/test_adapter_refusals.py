"""Every unsupported adapter kind is refused with a message naming the reason, and the engine still serves."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import copy_adapter, make_adapter, make_engine
from mux.engine.sequence import SamplingParams
from mux.errors import InvalidAdapter

GREEDY = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tiny_dir):
    return make_engine(tiny_dir, max_loras=2, max_lora_rank=8)


@pytest.fixture()
def good(tmp_path, tiny_adapters) -> Path:
    return copy_adapter(tiny_adapters["r4-attn"], tmp_path / "adapter")


def edit_config(path: Path, **changes) -> Path:
    cfg_file = path / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.update(changes)
    cfg_file.write_text(json.dumps(cfg))
    return path


def edit_weights(path: Path, fn) -> Path:
    file = path / "adapter_model.safetensors"
    tensors = load_file(file)
    fn(tensors)
    save_file(tensors, file)
    return path


def first_key(tensors, part="lora_A"):
    return next(k for k in sorted(tensors) if part in k)


def _dora(p):
    return edit_config(p, use_dora=True)


def _bias(p):
    return edit_config(p, bias="all")


def _modules_to_save(p):
    return edit_config(p, modules_to_save=["lm_head"])


def _lm_head_target(p):
    return edit_config(p, target_modules=["q_proj", "lm_head"])


def _embedding_tensor(p):
    return edit_weights(
        p, lambda t: t.update({"base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(4, 10)})
    )


def _not_lora(p):
    return edit_config(p, peft_type="IA3")


def _wrong_shape(p):
    def fn(t):
        k = first_key(t)
        t[k] = torch.zeros(t[k].shape[0], 65)

    return edit_weights(p, fn)


def _other_architecture(p):
    def fn(t):
        k = first_key(t)
        t[k.replace("layers.0", "layers.7")] = t.pop(k)
        b = k.replace("lora_A", "lora_B")
        t[b.replace("layers.0", "layers.7")] = t.pop(b)

    return edit_weights(p, fn)


def _missing_b(p):
    return edit_weights(p, lambda t: t.pop(first_key(t, "lora_B")))


def _nan(p):
    def fn(t):
        k = first_key(t)
        t[k] = t[k].clone()
        t[k][0, 0] = float("nan")

    return edit_weights(p, fn)


def _inf_in_b(p):
    def fn(t):
        k = first_key(t, "lora_B")
        t[k] = t[k].clone()
        t[k][-1, -1] = float("-inf")

    return edit_weights(p, fn)


def _pickle_only(p):
    (p / "adapter_model.safetensors").unlink()
    (p / "adapter_model.bin").write_bytes(pickle.dumps({"x": 1}))
    return p


def _missing_config(p):
    (p / "adapter_config.json").unlink()
    return p


def _bad_json(p):
    (p / "adapter_config.json").write_text("{not json")
    return p


def _corrupt_safetensors(p):
    data = (p / "adapter_model.safetensors").read_bytes()
    (p / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    return p


def _integer_weights(p):
    def fn(t):
        k = first_key(t)
        t[k] = t[k].to(torch.int32)

    return edit_weights(p, fn)


def _rank_lie(p):  # r4 tensors
    return edit_config(p, r=8)


def _rank_pattern_lie(p):
    return edit_config(p, rank_pattern={"v_proj": 2})


def _target_lie(p):  # tensors on q, k, v, o
    return edit_config(p, target_modules=["q_proj", "v_proj"])


def _target_regex_lie(p):
    return edit_config(p, target_modules=r".*\.q_proj")


def _excluded_module_has_weights(p):
    return edit_config(p, exclude_modules=["k_proj"])


def _layer_lie(p):  # tensors on both layers
    return edit_config(p, layers_to_transform=[1])


def _bad_target_type(p):
    return edit_config(p, target_modules=7)


def _bad_target_regex(p):
    return edit_config(p, target_modules="(")


def _bad_layers(p):
    return edit_config(p, layers_to_transform=["0"])


CASES = {
    "dora": (_dora, "DoRA"),
    "bias": (_bias, "bias"),
    "modules_to_save": (_modules_to_save, "modules_to_save"),
    "lm_head_target": (_lm_head_target, "lm_head"),
    "embedding_tensor": (_embedding_tensor, "embedding"),
    "not_lora": (_not_lora, "peft_type"),
    "wrong_shape": (_wrong_shape, "do not match the base model"),
    "other_architecture": (_other_architecture, "does not exist in the base model"),
    "missing_b": (_missing_b, "lora_B weight is missing"),
    "nan": (_nan, "NaN"),
    "inf_in_b": (_inf_in_b, "NaN or Inf"),
    "pickle_only": (_pickle_only, "pickle"),
    "missing_config": (_missing_config, "adapter_config.json"),
    "bad_json": (_bad_json, "not valid JSON"),
    "corrupt_safetensors": (_corrupt_safetensors, "safetensors"),
    "integer_weights": (_integer_weights, "floating point"),
    "rank_lie": (_rank_lie, "rank 4, but adapter_config.json says r=8"),
    "rank_pattern_lie": (_rank_pattern_lie, "v_proj: LoRA weights of rank 4, but adapter_config.json says r=2"),
    "target_lie": (_target_lie, "k_proj has LoRA weights but adapter_config.json does not target it"),
    "target_regex_lie": (_target_regex_lie, "does not target it"),
    "excluded_module_has_weights": (_excluded_module_has_weights, "k_proj has LoRA weights"),
    "layer_lie": (_layer_lie, "layers.0.self_attn.k_proj has LoRA weights"),
    "bad_target_type": (_bad_target_type, "target_modules must be"),
    "bad_target_regex": (_bad_target_regex, "not a valid module pattern"),
    "bad_layers": (_bad_layers, "layers_to_transform must be"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_refused_with_reason_and_engine_still_serves(engine, good, case):
    breaker, reason = CASES[case]
    bad = breaker(good)
    before = (engine.adapters.resident(), engine.blocks.num_free)
    with pytest.raises(InvalidAdapter, match=reason):
        engine.submit("Hello", GREEDY, bad)
    assert (engine.adapters.resident(), engine.blocks.num_free) == before  # nothing touched
    assert engine.generate(["Hello"], GREEDY)[0].finish_reason == "length"


def test_finite_weights_whose_sum_overflows_are_accepted(engine, good):
    """The finiteness check sums each tensor first; a sum that overflows must not refuse finite weights."""

    def fn(t):
        k = first_key(t)
        t[k] = torch.full_like(t[k], 3e38, dtype=torch.float32)  # finite; the sum is +inf in fp32

    ref = engine.adapters.prepare(edit_weights(good, fn))
    assert ref.rank == 4


def test_rank_above_maximum_refused(engine, tmp_path, tiny_dir):
    adapter = make_adapter(tiny_dir, tmp_path / "r16", r=16, targets=["q_proj"])
    with pytest.raises(InvalidAdapter, match="exceeds max_lora_rank 8"):
        engine.submit("Hello", GREEDY, adapter)


def test_pickle_is_never_unpickled(engine, good, monkeypatch):
    _pickle_only(good)
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("unpickled"))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    with pytest.raises(InvalidAdapter):
        engine.submit("Hello", GREEDY, good)


def test_missing_directory(engine, tmp_path):
    with pytest.raises(InvalidAdapter, match="does not exist"):
        engine.submit("Hello", GREEDY, tmp_path / "nope")


def test_rank_and_alpha_patterns_match_peft(tmp_path, tiny_dir):
    from conftest import peft_logits, record_logits

    adapter = make_adapter(
        tiny_dir,
        tmp_path / "pattern",
        r=4,
        alpha=8,
        targets=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"v_proj": 8},
        alpha_pattern={"down_proj": 3},
        seed=11,
    )
    engine = make_engine(tiny_dir, max_loras=1, max_lora_rank=8)
    seen = record_logits(engine)
    out = engine.generate(["Hello world"], GREEDY, [adapter])[0]
    ref = peft_logits(tiny_dir, adapter, out.prompt_token_ids + out.token_ids)
    n = len(out.prompt_token_ids)
    got = torch.stack(seen[out.request_id])
    assert (got - ref[n - 1 : -1]).abs().max().item() <= 1e-3


def test_a_kept_plan_does_not_pass_a_config_that_lies(engine, good):
    """Plans are kept per weights header and targeting keys: the same tensors under a lying config are checked."""
    assert engine.adapters.prepare(good).rank == 4  # the plan of these tensors is now kept
    with pytest.raises(InvalidAdapter, match="says r=8"):
        engine.adapters.prepare(_rank_lie(copy_adapter(good, good.parent / "lie")))


@pytest.mark.parametrize(
    "extra",
    [
        {"layers_to_transform": [1]},
        {"exclude_modules": ["model.layers.0.self_attn.k_proj"]},
        {"target_regex": r".*\.(q_proj|k_proj)"},
    ],
)
def test_config_that_narrows_the_targets_serves_as_peft(tmp_path, tiny_dir, extra):
    """PEFT builds LoRA only where the config says; an adapter saved so loads and matches PEFT's logits."""
    from conftest import peft_logits, record_logits

    regex = extra.pop("target_regex", None)
    adapter = make_adapter(tiny_dir, tmp_path / "narrow", r=4, targets=["q_proj", "k_proj"], seed=5, **extra)
    if regex:  # a regex string, which make_adapter does not pass through
        edit_config(adapter, target_modules=regex)
    engine = make_engine(tiny_dir, max_loras=1, max_lora_rank=8)
    seen = record_logits(engine)
    out = engine.generate(["Hello world"], GREEDY, [adapter])[0]
    ref = peft_logits(tiny_dir, adapter, out.prompt_token_ids + out.token_ids)
    n = len(out.prompt_token_ids)
    assert (torch.stack(seen[out.request_id]) - ref[n - 1 : -1]).abs().max().item() <= 1e-3


def test_rewritten_adapter_is_read_again(tmp_path, tiny_dir, tiny_adapters):
    """Invariant 6: new weights under the same directory never serve the old weights."""
    engine = make_engine(tiny_dir, max_loras=2, max_lora_rank=16)
    path = copy_adapter(tiny_adapters["r4-attn"], tmp_path / "same")
    first = engine.generate(["Hello world"], GREEDY, [path])[0].token_ids
    shutil.rmtree(path)
    copy_adapter(tiny_adapters["r16-all"], path)
    second = engine.generate(["Hello world"], GREEDY, [path])[0].token_ids
    expected = (
        make_engine(tiny_dir, max_loras=1, max_lora_rank=16)
        .generate(["Hello world"], GREEDY, [tiny_adapters["r16-all"]])[0]
        .token_ids
    )
    assert second == expected and first != second
