"""Adapters of any rank in the byte-bounded page pool: PEFT's results for ranks 1 to 128, alone and mixed in one
batch, after evictions that reused pages, with prefix-cache hits; what the default pool holds; refusals."""

from __future__ import annotations

import shutil

import pytest
from test_equivalence import GREEDY, PROMPTS, check_against_peft
from transformers import AutoModelForCausalLM

from bench.common import ALL, make_adapter
from conftest import make_engine, record_logits
from mux.config import LoRAConfig
from mux.errors import InvalidAdapter
from mux.lora.layers import MultiLoRAModel, pages_for

RANKS = (1, 8, 32, 64, 128)
PROMPT = " ".join(PROMPTS)  # several full KV blocks: a prefix the cache can serve again


@pytest.fixture(scope="module")
def rank_adapters(tmp_path_factory, tiny_dir):
    root = tmp_path_factory.mktemp("any-rank")
    return {r: make_adapter(tiny_dir, root / f"r{r}", r=r, alpha=2 * r, targets=ALL, seed=40 + r) for r in RANKS}


@pytest.fixture(scope="module")
def page_bytes(tiny_dir):
    return MultiLoRAModel(AutoModelForCausalLM.from_pretrained(tiny_dir), 1, 4).page_bytes


def test_every_rank_alone_mixed_and_in_reused_pages_matches_peft(tiny_dir, rank_adapters, page_bytes):
    """A pool of 48 pages: ranks 1, 8, 32 and 64 (27 pages) in one batch with a base row; rank 128 (32 pages)
    then evicts three of them; the three come back into pages rank 128 held, beside rank 64, and their prompts
    hit the prefix cache."""
    engine = make_engine(tiny_dir, max_loras=4, max_lora_rank=128, max_lora_bytes=48 * page_bytes)
    seen = record_logits(engine)

    def run(ranks):
        adapters = [rank_adapters[r] if r else None for r in ranks]
        outs = engine.generate([PROMPT] * len(ranks), GREEDY, adapters)
        for adapter, out in zip(adapters, outs, strict=True):
            check_against_peft(tiny_dir, adapter, out, seen[out.request_id])

    run([1, 8, 32, 64, 0])
    run([128])
    stats = engine.adapters.stats()
    assert stats["counters"]["evictions"]["device_to_host"] == 3
    assert stats["tiers"]["device"]["free_bytes"] == 0
    hits = engine.blocks.hit_tokens
    run([8, 32, 1, 64])
    assert engine.blocks.hit_tokens > hits
    by_rank = {a["rank"]: a for a in engine.adapters.stats()["adapters"] if a["tier"] == "device"}
    assert sorted(by_rank) == [1, 8, 32, 64]
    assert all(a["device_bytes"] == pages_for(r) * page_bytes for r, a in by_rank.items())


def test_the_default_pool_holds_16_rank_8_and_2_rank_64_in_the_bytes_of_16_rank_16_slots(tiny_dir, tmp_path):
    config = LoRAConfig()
    assert config.max_lora_rank >= 64
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    lora = MultiLoRAModel(model, config.max_loras, config.max_lora_rank, config.max_lora_bytes)
    assert lora.num_pages * lora.page_bytes <= 16 * 16 * lora.rank_bytes  # 16 slots of rank 16, as before
    r8 = make_adapter(tiny_dir, tmp_path / "r8", r=8, alpha=8, targets=ALL, seed=1)
    r64 = make_adapter(tiny_dir, tmp_path / "r64", r=64, alpha=8, targets=ALL, seed=2)
    paths = [shutil.copytree(r8, tmp_path / f"r8-{i}") for i in range(16)] + [r64, shutil.copytree(r64, tmp_path / "b")]
    from mux.lora.manager import AdapterManager

    manager = AdapterManager(lora, LoRAConfig(async_loading=False))
    for path in paths:
        ref = manager.prepare(path)
        assert manager.acquire(ref) is not None
        manager.release(ref.key)
    assert len(manager.resident()) == 18 and manager.counters["evictions"]["device_to_host"] == 0


def test_an_adapter_larger_than_the_pool_is_refused_with_its_bytes(tiny_dir, rank_adapters, page_bytes):
    engine = make_engine(tiny_dir, max_lora_rank=128, max_lora_bytes=8 * page_bytes)
    with pytest.raises(InvalidAdapter, match=f"rank 64 needs {16 * page_bytes} bytes .* holds {8 * page_bytes}"):
        engine.adapters.prepare(rank_adapters[64])
    assert engine.adapters.prepare(rank_adapters[32]).rank == 32  # 8 pages: the whole pool
    assert len(engine.adapters.free_pages) == 8


def test_a_pool_smaller_than_one_page_is_refused(tiny_dir, page_bytes):
    with pytest.raises(ValueError, match="holds no page"):
        MultiLoRAModel(AutoModelForCausalLM.from_pretrained(tiny_dir), 1, 16, page_bytes - 1)
