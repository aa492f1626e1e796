"""A burst of long prompts larger than the KV cache is queued (and preempted/recomputed), never crashed,
and every answer equals the one it gets alone."""

from __future__ import annotations

from mux.config import CacheConfig, EngineConfig, ModelConfig
from mux.engine.engine import Engine
from mux.engine.sequence import SamplingParams


def test_burst_of_long_prompts_over_the_kv_budget(tiny_dir):
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    prompts = [[(7 * i + j) % 1000 + 3 for j in range(100 + 5 * i)] for i in range(8)]
    # tiny Llama: 2 layers x (K, V) x 2 heads x 16 dims x 4 bytes = 512 B per token; 24 blocks = 384 tokens
    model = ModelConfig(model=str(tiny_dir))
    small = Engine(EngineConfig(model=model, cache=CacheConfig(kv_cache_bytes=24 * 16 * 512)))
    assert small.blocks.num_blocks * small.blocks.block_size < sum(len(p) + 12 for p in prompts)
    burst = small.generate(prompts, params)
    assert small.blocks.num_free == small.blocks.num_blocks and small.num_running == 0
    alone = Engine(EngineConfig(model=model, cache=CacheConfig(kv_cache_bytes=64 << 20)))
    for prompt, got in zip(prompts, burst, strict=True):
        assert got.token_ids == alone.generate([prompt], params)[0].token_ids
