"""The LoRA layers skip the linears no adapter of the step targets (their delta is exactly zero)."""

from __future__ import annotations

from conftest import make_engine


def test_layers_of_names_only_the_targeted_linears(tiny_dir, tiny_adapters):
    engine = make_engine(tiny_dir, max_loras=4, max_lora_rank=16)
    refs = {n: engine.prepare_adapter(tiny_adapters[n]) for n in ("r4-attn", "r2-down", "r16-all")}
    engine.generate(["Hello"] * 3, None, list(refs.values()))  # loads all three into slots
    slot = {n: engine.adapters.entries[r.key].slot for n, r in refs.items()}
    lora = engine.lora
    names = list(lora.layers)

    def targeted(*adapters):
        used = lora.layers_of([slot[a] for a in adapters])
        return None if used is None else {names[i].rsplit(".", 1)[-1] for i in used}

    assert targeted("r2-down") == {"down_proj"}
    assert targeted("r4-attn", "r2-down") >= {"q_proj", "down_proj"} and "gate_proj" not in targeted("r4-attn")
    assert targeted("r16-all") is None and targeted("r2-down", "r16-all") is None  # every linear: no skipping
    assert lora.layers_of([-1]) == frozenset()  # base-only rows target nothing
    assert lora.slot_layers[slot["r2-down"]] is lora.layers_of([slot["r2-down"]])  # one shared set per layout
