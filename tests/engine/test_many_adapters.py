"""200 adapters, 4 device slots, a small host tier, concurrent requests: every answer equals PEFT's."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, GenerationConfig

from bench.common import ALL, ATTN, MLP, write_random_adapter
from mux.config import CacheConfig, EngineConfig, LoRAConfig, ModelConfig
from mux.engine.engine import Engine
from mux.engine.sequence import SamplingParams

N_ADAPTERS = 200
NEW_TOKENS = 5
PROMPTS = ["Hello world", "The cat sat on", "Numbers: 1 2 3", "Why is the sky"]


@pytest.fixture(scope="module")
def many(tmp_path_factory, tiny_dir):
    root = tmp_path_factory.mktemp("many")
    rnd = random.Random(0)
    return [
        write_random_adapter(
            tiny_dir,
            root / f"a{i:03d}",
            r=rnd.choice([2, 4, 8]),
            alpha=rnd.choice([4, 16]),
            targets=rnd.choice([ALL, ATTN, MLP, ["q_proj", "down_proj"]]),
            seed=i,
            std=0.15,
            use_rslora=rnd.random() < 0.3,
        )
        for i in range(N_ADAPTERS)
    ]


def peft_reference(tiny_dir, tokenizer, jobs):
    base = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    cfg = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=2)
    base.generation_config.eos_token_id = None
    out = {}
    for path in sorted({p for p, _ in jobs}, key=str):
        model = PeftModel.from_pretrained(base, path) if path else base
        for prompt in {q for p, q in jobs if p == path}:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            with torch.no_grad():
                out[path, prompt] = model.generate(ids, generation_config=cfg)[0, ids.shape[1] :].tolist()
        if path:
            base = model.unload()
    return out


def test_200_adapters_4_slots_concurrent(tiny_dir, many):
    one = many[0]
    per_adapter = sum(f.stat().st_size for f in one.iterdir())
    engine = Engine(
        EngineConfig(
            model=ModelConfig(model=str(tiny_dir)),
            lora=LoRAConfig(max_loras=4, max_lora_rank=8, max_cpu_adapter_bytes=12 * per_adapter, max_cpu_loras=16),
            cache=CacheConfig(kv_cache_bytes=16 << 20),
        )
    )
    rnd = random.Random(1)
    jobs = [(p, rnd.choice(PROMPTS)) for p in many] + [(rnd.choice(many[:5]), PROMPTS[0]) for _ in range(40)]
    jobs += [(None, q) for q in PROMPTS]
    rnd.shuffle(jobs)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    engine.start()
    try:
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda j: engine.submit(j[1], params, j[0]).result(), jobs))
    finally:
        engine.stop()
    ref = peft_reference(tiny_dir, engine.tokenizer, jobs)
    mismatches = [(str(p), q) for (p, q), r in zip(jobs, results, strict=True) if r.token_ids != ref[p, q]]
    assert not mismatches
    stats = engine.adapters.stats()
    ev = stats["counters"]["evictions"]
    assert ev["device_to_host"] > 0 and ev["host_to_disk"] > 0
    assert stats["tiers"]["host"]["used_bytes"] <= stats["tiers"]["host"]["capacity_bytes"]
    assert engine.adapters.num_pinned == 0 and engine.blocks.num_free == engine.blocks.num_blocks
    assert {a["tier"] for a in stats["adapters"]} <= {"device", "host", "disk"}
    assert len(stats["adapters"]) <= 2 * (16 + 4) + 1  # per-key statistics of cold adapters stay bounded
    assert 0 < sum(a["uses"] for a in stats["adapters"]) <= len(jobs) - len(PROMPTS)


def test_cold_adapter_is_admitted_within_bounded_steps_under_a_hot_flood(tiny_dir, many):
    """A hot set larger than the slot pool keeps every slot busy; a cold request still gets in, boundedly."""
    from mux.config import SchedulerConfig

    engine = Engine(
        EngineConfig(
            model=ModelConfig(model=str(tiny_dir)),
            lora=LoRAConfig(max_loras=2, max_lora_rank=8, async_loading=False),
            scheduler=SchedulerConfig(starvation_steps=8),
            cache=CacheConfig(kv_cache_bytes=16 << 20),
        )
    )
    hot = many[:3]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    flood = [engine.submit("Hello", params, hot[i % 3]) for i in range(6)]
    engine.step()
    cold = engine.submit("Hello", params, many[100])
    steps = 0
    while not cold.finished:
        flood += [engine.submit("Hello", params, hot[steps % 3])]  # one more hot request every step
        engine.step()
        steps += 1
        assert steps < 60, "cold request starved"
    for s in flood:
        s.cancel()
    while engine.step():
        pass
    assert engine.adapters.num_pinned == 0
