"""The prefix cache (block_manager.py): which blocks are shared, with whom, and that a shared block is never
written; on the engine, a request served from the cache gives PEFT's logits."""

from __future__ import annotations

import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import make_engine, peft_logits, record_logits
from mux.config import SchedulerConfig
from mux.engine.block_manager import BlockManager
from mux.engine.scheduler import Scheduler
from mux.engine.sequence import SamplingParams, Sequence
from tests.engine.fakes import FakeAdapter, FakeAdapters

BS = 4


def seq(prompt, adapter=None, tenant="t", **params):
    return Sequence(list(prompt), SamplingParams(max_tokens=4, **params), FakeAdapter(adapter) if adapter else None,
                    tenant=tenant)  # fmt: skip


def compute(blocks: BlockManager, s: Sequence) -> None:
    """Admit `s` with whatever the cache holds, and pretend its whole prompt ran."""
    hit = blocks.cached_prefix(s)
    blocks.allocate(s, s.num_tokens - len(hit) * BS, hit)
    s.num_computed = s.num_tokens
    blocks.commit(s)


def test_full_blocks_are_shared_and_one_token_is_always_left():
    blocks = BlockManager(16, BS)
    a = seq(range(10))
    compute(blocks, a)  # blocks of tokens 0-3 and 4-7 are full, 8-9 is not
    assert blocks.num_cached == 2
    b = seq(range(10))
    assert blocks.cached_prefix(b) == a.block_table[:2]
    c = seq(range(8))  # both blocks match, but the last token must run to give the next token's logits
    assert blocks.cached_prefix(c) == a.block_table[:1]
    d = seq([*range(5), 99, 6, 7, 8])  # differs in the second block
    assert blocks.cached_prefix(d) == a.block_table[:1]
    assert blocks.cached_prefix(seq([99, *range(1, 10)])) == []


@pytest.mark.parametrize(
    "other",
    [
        dict(tenant="u"),  # another tenant, same adapter: never shared (its TTFT would tell what others asked)
        dict(adapter="other-weights"),  # the same tenant, other weights: other K/V
        dict(adapter=None),  # the base model
        dict(prompt_logprobs=0),  # wants every prompt position's logits
    ],
)
def test_not_shared_across_tenants_adapters_or_with_prompt_logprobs(other):
    blocks = BlockManager(16, BS)
    compute(blocks, seq(range(10), adapter="k"))
    spec = dict(adapter="k", tenant="t") | other
    assert blocks.cached_prefix(seq(range(10), **spec)) == []
    assert blocks.cached_prefix(seq(range(10), adapter="k")) != []


def test_disabled_registers_nothing():
    blocks = BlockManager(16, BS, prefix_caching=False)
    compute(blocks, seq(range(10)))
    assert blocks.num_cached == 0 and blocks.cached_prefix(seq(range(10))) == []


def test_refcounts_idle_blocks_are_free_space_and_reused_oldest_first():
    blocks = BlockManager(6, BS)
    a = seq(range(12))  # 3 full blocks, all registered
    compute(blocks, a)
    b = seq(range(13))
    compute(blocks, b)  # takes a's 3 blocks, adds one
    assert b.block_table[:3] == a.block_table and b.num_cached == 12 and blocks.num_free == 2
    assert blocks.hit_tokens == 12 and blocks.queried_tokens == 25
    blocks.free(a)
    assert blocks.num_free == 2  # b still holds them
    blocks.free(b)
    assert blocks.num_free == 6 and blocks.num_cached == 3  # cached blocks nobody holds are free space
    # A new sequence of other tokens needing all 6 blocks takes the 2 plain ones, then the cached ones
    # oldest released first: b released its tail first, so a chain's head survives longest
    c = seq(range(100, 123))
    blocks.allocate(c, 23)
    assert blocks.num_free == 0 and blocks.num_cached == 0
    blocks.free(c)
    assert blocks.cached_prefix(seq(range(13))) == []


def test_eviction_takes_a_chains_tail_first():
    blocks = BlockManager(4, BS)
    a = seq(range(13))  # 3 registered blocks + 1 partly filled
    compute(blocks, a)
    table = list(a.block_table)
    blocks.free(a)
    blocks.allocate(seq(range(100, 106)), 6)  # 2 blocks: the plain one, then the chain's last block
    assert blocks.cached_prefix(seq(range(13))) == table[:2]  # its first two blocks still hit


def test_reset_forgets_every_block_and_leaks_none():
    blocks = BlockManager(8, BS)
    held, idle = seq(range(9)), seq(range(50, 59))
    compute(blocks, held)
    compute(blocks, idle)
    blocks.free(idle)
    assert blocks.reset_prefix_cache() == 4 and blocks.num_cached == 0
    assert blocks.cached_prefix(seq(range(9))) == [] and blocks.num_free == 8 - 3
    held.num_computed += 4  # its next tokens fill a block: registered, but its chain's head is gone
    held.prompt_ids += [9, 10, 11, 12]
    blocks.allocate(held, 0)
    blocks.commit(held)
    blocks.free(held)
    assert blocks.num_free == 8 and blocks.cached_prefix(seq(range(13))) == []


def test_can_allocate_counts_taking_idle_hits():
    blocks = BlockManager(3, BS)
    a = seq(range(9))
    compute(blocks, a)  # 2 registered blocks + 1
    blocks.free(a)
    s = seq(range(9))
    hit = blocks.cached_prefix(s)
    assert len(hit) == 2 and blocks.can_allocate(s, 1, hit)  # 2 idle hits + 1 new block = 3 free
    other = seq(range(50, 55))
    blocks.allocate(other, 5)  # takes the one plain block and one idle block (the chain's tail)
    hit = blocks.cached_prefix(s)
    assert len(hit) == 1 and not blocks.can_allocate(s, 5, hit)


def test_scheduler_starts_a_hit_after_its_cached_blocks_and_a_preempted_sequence_resumes_from_them():
    blocks = BlockManager(64, BS)
    sched = Scheduler(SchedulerConfig().for_device("cpu"), blocks, FakeAdapters(2))
    first, second = seq(range(11), adapter="x"), seq(range(11), adapter="x")
    sched.add(first)
    step(sched, blocks)
    sched.add(second)
    out = step(sched, blocks)
    assert [(s.seq, s.num_tokens, s.sample) for s in out.scheduled] == [(second, 3, True)]
    assert second.num_cached == 8
    sched._preempt(first)
    out = step(sched, blocks)  # readmitted: its prompt and first output token are in the cache but one token
    assert (first, 12 - 8) in [(s.seq, s.num_tokens) for s in out.scheduled]
    for s in (first, second):
        sched.finish(s, "length")
    assert blocks.num_free == blocks.num_blocks and sched.adapters.num_pinned == 0


def step(sched: Scheduler, blocks: BlockManager):
    out = sched.schedule()
    for s in out.scheduled:
        s.seq.num_computed += s.num_tokens
        blocks.commit(s.seq)
        if s.sample:
            s.seq.output_ids.append(7)
    return out


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 2), st.integers(1, 14), st.booleans()), max_size=30))
def test_a_shared_block_is_never_written_and_nothing_leaks(ops):
    """Random traffic over a few prompts, tenants and adapters in a small cache (so it preempts and evicts):
    every token a step computes lands in a block only its sequence holds, no registered block is written, the
    reference counts equal the tables, and at the end every block is free."""
    blocks = BlockManager(12, BS)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=16), blocks, FakeAdapters(3))
    live = []
    for prompt, who, length, finish in ops:
        s = seq([prompt * 100 + i for i in range(length)], adapter=f"a{who % 2}", tenant=f"t{who}")
        sched.add(s)
        live.append(s)
        out = sched.schedule()
        for sc in out.scheduled:
            first = sc.seq.num_computed
            for p in range(first, first + sc.num_tokens):
                block = sc.seq.block_table[p // BS]
                assert blocks._refs[block] == 1 and block not in blocks._digest_of
        for sc in out.scheduled:
            sc.seq.num_computed += sc.num_tokens
            blocks.commit(sc.seq)
            if sc.sample:
                sc.seq.output_ids.append(1)
        held = [b for s in sched.running for b in s.block_table]
        assert all(blocks._refs[b] == held.count(b) for b in range(blocks.num_blocks))
        assert blocks.num_free == blocks.num_blocks - len(set(held))
        if finish and sched.running:
            sched.finish(sched.running[0], "stop")
    for s in live:
        if s.status.value != "finished":
            sched.finish(s, "cancelled")
    assert blocks.num_free == blocks.num_blocks


# ---- on the engine ----------------------------------------------------------------------------

SYSTEM = "You are a careful assistant. Answer in one short sentence, and never repeat the question back. "
GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tiny_dir):
    return make_engine(tiny_dir, max_loras=4, max_lora_rank=16)


@pytest.mark.parametrize("name", ["r4-attn", "r16-all", "r8-all-rslora", None])
def test_requests_served_from_the_cache_match_peft(engine, tiny_dir, tiny_adapters, name):
    adapter = tiny_adapters[name] if name else None
    seen = record_logits(engine)
    hits = engine.blocks.hit_tokens
    prompts = [SYSTEM + "What is the capital of France?", SYSTEM + "Name a prime number."]
    first = engine.generate(prompts[:1], GREEDY, [adapter])[0]
    assert first.token_ids  # the shared system prompt's blocks are now cached
    later = engine.generate(prompts, GREEDY, [adapter, adapter])  # both start after the cached blocks
    assert engine.blocks.hit_tokens - hits >= 2 * 16
    assert later[0].token_ids == first.token_ids
    for out in later:
        ids = out.prompt_token_ids + out.token_ids
        n = len(out.prompt_token_ids)
        expected = peft_logits(tiny_dir, adapter, ids)[n - 1 : len(ids) - 1]
        assert (torch.stack(seen[out.request_id]) - expected).abs().max().item() <= 1e-3
        assert out.token_ids == expected.argmax(-1).tolist()
    assert engine.adapters.num_pinned == 0 and engine.blocks.num_free == engine.blocks.num_blocks


def test_no_sharing_across_tenants_or_adapter_versions(engine, tiny_dir, tiny_adapters, tmp_path):
    prompt = SYSTEM + "Tell me a fact."
    adapter = shutil.copytree(tiny_adapters["r8-mlp"], tmp_path / "v")
    engine.generate([prompt], GREEDY, [adapter])
    hits = engine.blocks.hit_tokens
    stream = engine.submit(prompt, GREEDY, adapter, tenant="someone-else")
    assert stream.result().token_ids and engine.blocks.hit_tokens == hits and stream.num_cached_tokens == 0
    # the same path, new weights (a re-upload publishes a new file): the old version's K/V must not serve it
    shutil.rmtree(adapter)
    shutil.copytree(tiny_adapters["r8-all-rslora"], adapter)
    seen = record_logits(engine)
    out = engine.generate([prompt], GREEDY, [adapter])[0]
    assert engine.blocks.hit_tokens == hits
    ids = out.prompt_token_ids + out.token_ids
    expected = peft_logits(tiny_dir, adapter, ids)[len(out.prompt_token_ids) - 1 : len(ids) - 1]
    assert (torch.stack(seen[out.request_id]) - expected).abs().max().item() <= 1e-3


def test_cached_tokens_reach_the_stream(engine):
    prompt = "A prompt no other test in this module sends, " * 4
    a = engine.submit(prompt, GREEDY)
    a.result()
    b = engine.submit(prompt, GREEDY)
    b.result()
    n = len(a.prompt_ids)
    assert a.num_cached_tokens == 0 and b.num_cached_tokens == (n - 1) // 16 * 16 >= 32
