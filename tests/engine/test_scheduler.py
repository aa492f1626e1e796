"""Continuous batching policy, in milliseconds: no model, no torch."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mux.config import SchedulerConfig
from mux.engine.block_manager import BlockManager
from mux.engine.scheduler import Scheduler
from mux.engine.sequence import SamplingParams, Sequence, Status
from tests.engine.fakes import FakeAdapter, FakeAdapters


def make(num_blocks=64, block_size=4, slots=2, **cfg):  # prefill first below 16 decodes by default
    blocks = BlockManager(num_blocks, block_size)
    table = FakeAdapters(slots)
    return Scheduler(SchedulerConfig(**cfg).for_device("cpu"), blocks, table), blocks, table


def seq(n_prompt=5, adapter=None, max_tokens=4):
    return Sequence(
        list(range(n_prompt)), SamplingParams(max_tokens=max_tokens), FakeAdapter(adapter) if adapter else None
    )


def run_step(sched):
    """Pretend the model ran: advance computed tokens and append a sampled token."""
    out = sched.schedule()
    for s in out.scheduled:
        s.seq.num_computed += s.num_tokens
        if s.sample:
            s.seq.output_ids.append(0)
    return out


def test_prefill_then_decodes_join_and_leave():
    sched, blocks, _ = make(prefill_first_max_decodes=0)  # mixed steps
    a = seq()
    sched.add(a)
    out = run_step(sched)
    assert [(s.seq, s.num_tokens, s.sample) for s in out.scheduled] == [(a, 5, True)]
    b = seq(3)
    sched.add(b)
    out = run_step(sched)  # a decodes while b prefills in the same step
    assert [(s.seq, s.num_tokens) for s in out.scheduled] == [(a, 1), (b, 3)]
    sched.finish(a, "length")
    out = run_step(sched)
    assert [s.seq for s in out.scheduled] == [b]
    sched.finish(b, "length")
    assert blocks.num_free == blocks.num_blocks and not sched.has_work()


def test_chunked_prefill_within_token_budget():
    sched, _, _ = make(max_num_batched_tokens=4)
    a = seq(10)
    sched.add(a)
    chunks = [(s.num_tokens, s.sample) for _ in range(3) for s in run_step(sched).scheduled]
    assert chunks == [(4, False), (4, False), (2, True)]


def test_prefill_first_gives_new_prompts_a_step_of_their_own():
    sched, _, _ = make()
    a = seq(max_tokens=100)
    sched.add(a)
    run_step(sched)
    b = seq(3)
    sched.add(b)
    out = run_step(sched)  # b prefills alone: its first token does not wait for a's decode
    assert [(s.seq, s.num_tokens, s.sample) for s in out.scheduled] == [(b, 3, True)]
    out = run_step(sched)
    assert [(s.seq, s.num_tokens) for s in out.scheduled] == [(a, 1), (b, 1)]


def test_many_decodes_or_a_zero_limit_mix_prefills_into_the_decode_step():
    for running, limit in ((3, 2), (1, 0)):
        sched, _, _ = make(num_blocks=256, prefill_first_max_decodes=limit)
        old = [seq(max_tokens=100) for _ in range(running)]
        for s in old:
            sched.add(s)
        run_step(sched)
        new = seq(3)
        sched.add(new)
        assert {s.seq for s in run_step(sched).scheduled} == {*old, new}


def test_prefill_first_never_skips_decodes_two_steps_running():
    sched, _, _ = make(num_blocks=256)
    a = seq(max_tokens=100)
    sched.add(a)
    run_step(sched)
    decoded = []
    for _ in range(6):  # a new prompt arrives before every step
        sched.add(seq(3, max_tokens=100))
        decoded.append(a in [s.seq for s in run_step(sched).scheduled])
    assert decoded == [False, True] * 3


def test_prefill_first_carries_only_chunks_that_finish_a_prompt():
    """A chunk that leaves its prompt unfinished brings no first token sooner: it rides with the decodes."""
    sched, _, _ = make(num_blocks=256, block_size=4, max_num_batched_tokens=4)
    a = seq(6, max_tokens=100)
    sched.add(a)
    assert [(s.seq, s.num_tokens) for s in run_step(sched).scheduled] == [(a, 4)]  # a normal step
    b, c = seq(6, max_tokens=100), seq(2, max_tokens=100)
    sched.add(b)
    sched.add(c)
    out = run_step(sched)  # prefill-only: a's last chunk and all of c; b's first chunk would not finish b
    assert [(s.seq, s.num_tokens, s.sample) for s in out.scheduled] == [(a, 2, True), (c, 2, True)]
    out = run_step(sched)  # b's first chunk goes with the decodes
    assert [(s.seq, s.num_tokens) for s in out.scheduled] == [(a, 1), (c, 1), (b, 2)]


def test_a_long_prompt_never_makes_the_decodes_skip_a_step():
    sched, _, _ = make(num_blocks=256, max_num_batched_tokens=8)
    a = seq(max_tokens=100)
    sched.add(a)
    run_step(sched)
    sched.add(seq(30))  # four chunks of 8 (then 7 + a's decode)
    assert all(a in [s.seq for s in run_step(sched).scheduled] for _ in range(5))


def test_prefill_first_falls_back_to_a_normal_step_when_the_cache_is_full():
    sched, blocks, _ = make(num_blocks=3, block_size=4, max_num_batched_tokens=4)
    a, b = seq(4, max_tokens=100), seq(8, max_tokens=100)
    sched.add(a)
    run_step(sched)
    sched.add(b)
    out = run_step(sched)  # a decodes; b's first chunk fills the cache
    assert [(s.seq, s.num_tokens) for s in out.scheduled] == [(a, 1), (b, 3)] and blocks.num_free == 0
    c = seq(3)
    sched.add(c)
    out = run_step(sched)  # no room for c's prefill: a normal step instead of an empty one
    assert a in [s.seq for s in out.scheduled] and c.status is Status.WAITING


def test_blocks_grow_with_tokens_not_max_length():
    sched, _, _ = make(block_size=4)
    a = seq(5, max_tokens=1000)
    sched.add(a)
    run_step(sched)
    assert len(a.block_table) == 2  # 5 tokens -> 2 blocks of 4, not 1005 tokens' worth
    for _ in range(4):
        run_step(sched)
    assert len(a.block_table) == 3


def test_preemption_when_kv_is_full_frees_and_requeues_newest():
    sched, blocks, _ = make(num_blocks=4, block_size=4)
    a, b = seq(7), seq(7)
    sched.add(a)
    sched.add(b)
    run_step(sched)  # both prefilled: 2 blocks each, cache full
    assert blocks.num_free == 0
    run_step(sched)  # a's 8th token fits its block; b too
    out = run_step(sched)  # a needs a 3rd block: b (newest) is preempted
    assert out.preempted == [b] and b.status is Status.WAITING and b.num_computed == 0
    assert sched.waiting[0] is b and b.block_table == []


def test_distinct_adapters_never_exceed_slots_and_resident_ones_skip_ahead():
    sched, _, table = make(slots=2, starvation_steps=100)
    seqs = [seq(adapter="x"), seq(adapter="y"), seq(adapter="z"), seq(adapter="x")]
    for s in seqs:
        sched.add(s)
    out = run_step(sched)
    admitted = [s.seq for s in out.scheduled]
    assert admitted == [seqs[0], seqs[1], seqs[3]]  # z waits; the second x request does not wait behind it
    assert len({s.adapter.key for s in admitted}) <= 2 and seqs[2].status is Status.WAITING
    sched.finish(seqs[1], "length")
    out = run_step(sched)
    assert seqs[2] in [s.seq for s in out.scheduled] and table.slot_of["z"] == 1


@pytest.mark.parametrize("max_decodes", [0, 16])  # mixed steps; prefill-first steps
def test_starved_request_blocks_admission_until_a_slot_frees(max_decodes):
    sched, _, _ = make(slots=1, starvation_steps=2, prefill_first_max_decodes=max_decodes)
    hot = [seq(adapter="hot", max_tokens=100) for _ in range(2)]
    cold = seq(adapter="cold")
    sched.add(hot[0])
    sched.add(cold)
    for _ in range(3):
        run_step(sched)
    sched.add(hot[1])  # resident adapter, but the starved cold request is now ahead of everything
    run_step(sched)
    assert hot[1].status is Status.WAITING
    sched.finish(hot[0], "length")
    out = run_step(sched)
    assert cold in [s.seq for s in out.scheduled]


def test_loading_adapter_waits_while_others_go_ahead():
    sched, _, table = make(slots=2)
    cold, warm = seq(adapter="cold"), seq(adapter="warm")
    table.loading.add("cold")
    sched.add(cold)
    sched.add(warm)
    out = run_step(sched)
    assert [s.seq for s in out.scheduled] == [warm]
    assert cold.slot >= 0 and table.refs["cold"] == 1  # its slot is reserved (pinned) while it loads
    table.loading.clear()
    out = run_step(sched)
    assert cold in [s.seq for s in out.scheduled]


def test_cancel_while_waiting_releases_the_reserved_slot():
    sched, _, table = make(slots=1)
    a = seq(adapter="x")
    table.loading.add("x")
    sched.add(a)
    run_step(sched)
    assert table.num_pinned == 1
    sched.finish(a, "cancelled")
    assert table.num_pinned == 0


def test_finish_waiting_and_running_frees_everything():
    sched, blocks, table = make()
    a, b = seq(adapter="x"), seq(adapter="x")
    sched.add(a)
    run_step(sched)
    sched.add(b)
    sched.finish(b, "cancelled")
    sched.finish(a, "cancelled")
    assert blocks.num_free == blocks.num_blocks and table.num_pinned == 0 and not sched.has_work()


def test_token_ids_across_prompt_and_output():
    s = seq(3)
    s.output_ids = [10, 11]
    whole = [0, 1, 2, 10, 11]
    for start in range(5):
        for end in range(start, 6):
            assert s.token_ids(start, end) == whole[start:end]


def test_a_flooding_tenant_does_not_starve_a_light_one():
    sched, _, _ = make(num_blocks=256, max_num_seqs=4)
    flood = [Sequence([1, 2, 3], SamplingParams(max_tokens=4), tenant="flood") for _ in range(20)]
    for seq in flood:
        sched.add(seq)
    light = Sequence([1, 2, 3], SamplingParams(max_tokens=4), tenant="light")
    sched.add(light)  # queued behind 20 of the flood's
    out = sched.schedule()
    admitted = [s.seq for s in out.scheduled]
    assert light in admitted  # fewest running goes next: the light tenant gets the second place
    assert [s.tenant for s in admitted] == ["flood", "light", "flood", "flood"]
    assert admitted[0] is flood[0] and admitted[2] is flood[1]  # FIFO within a tenant


def test_a_light_tenants_prompt_gets_a_step_without_the_floods_prompts():
    """A tenant with fewer sequences running is not made to wait for a busier tenant's prompts in the same step:
    those go in the next step. Both orders of step (prefill-only and mixed with the decodes)."""
    for max_decodes in (16, 0):  # prefill first while few decode; every step mixed
        sched, _, _ = make(num_blocks=256, prefill_first_max_decodes=max_decodes)
        running = [Sequence([1, 2, 3], SamplingParams(max_tokens=50), tenant="flood") for _ in range(4)]
        for s in running:
            sched.add(s)
        run_step(sched)
        run_step(sched)  # four flood sequences decoding
        waiting = [Sequence([1] * 9, SamplingParams(max_tokens=4), tenant="flood") for _ in range(2)]
        light = Sequence([1, 2, 3], SamplingParams(max_tokens=4), tenant="light")
        for s in [*waiting, light]:
            sched.add(s)  # the flood's prompts queued first
        admitted = {s.seq for s in run_step(sched).scheduled if s.seq not in running}
        assert admitted == {light}
        later = set()
        for _ in range(2):  # the next prefill-only step, or the next mixed step, takes them
            later |= {s.seq for s in run_step(sched).scheduled}
        assert set(waiting) <= later


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(1, 12), st.integers(1, 6), st.integers(0, 3)), max_size=40))
def test_every_tenants_requests_finish(arrivals):
    """Requests of three tenants arriving over time, in a small cache with two slots (so steps preempt, wait for
    slots and skip busier tenants' prompts): every request finishes within a bounded number of steps, and the
    cache and slots are all free at the end."""
    sched, blocks, table = make(num_blocks=16, slots=2, max_num_batched_tokens=16, max_num_seqs=6)
    pending = list(arrivals)
    live: list[Sequence] = []
    for _ in range(2000):
        if pending:
            tenant, length, max_tokens, adapter = pending.pop(0)
            params = SamplingParams(max_tokens=max_tokens)
            s = Sequence(list(range(length)), params, FakeAdapter(f"a{adapter}"), tenant=f"t{tenant}")
            sched.add(s)
            live.append(s)
        run_step(sched)
        for s in list(sched.running):
            if len(s.output_ids) >= s.params.max_tokens:
                sched.finish(s, "length")
        if not pending and not sched.has_work():
            break
    assert all(s.status is Status.FINISHED for s in live)
    assert blocks.num_free == blocks.num_blocks and table.num_pinned == 0


def test_equally_busy_tenants_share_a_step():
    sched, _, _ = make(num_blocks=256)
    for tenant in ("a", "b"):
        sched.add(Sequence([1, 2, 3], SamplingParams(max_tokens=50), tenant=tenant))
    run_step(sched)
    new = [Sequence([1, 2], SamplingParams(), tenant=t) for t in ("a", "b", "a")]
    for s in new:
        sched.add(s)
    admitted = [s.seq for s in sched.schedule().scheduled]
    assert admitted == new  # one running each: all three in one step, in fair order


def test_one_tenant_keeps_plain_fifo():
    sched, _, _ = make(num_blocks=256, max_num_seqs=3)
    seqs = [Sequence([1, 2], SamplingParams(), tenant="a") for _ in range(5)]
    for seq in seqs:
        sched.add(seq)
    assert [s.seq for s in sched.schedule().scheduled] == seqs[:3]


def test_negative_prefill_first_limit_is_refused():
    with pytest.raises(ValueError, match="prefill_first_max_decodes must be >= 0"):
        SchedulerConfig(prefill_first_max_decodes=-1)


def test_decodes_are_not_skipped_while_a_request_waits_for_a_slot():
    """Finishing the running sequences is what frees a slot, so with a request waiting for one, a new prompt of a
    resident adapter joins the decode step instead of getting a prefill-only step."""
    sched, _, _ = make(slots=1, starvation_steps=100)
    hot = [seq(adapter="hot", max_tokens=100) for _ in range(2)]
    sched.add(hot[0])
    run_step(sched)
    cold = seq(adapter="cold")
    sched.add(cold)
    run_step(sched)  # every slot is pinned: cold waits
    sched.add(hot[1])
    assert {s.seq for s in run_step(sched).scheduled} == {hot[0], hot[1]}
    sched.finish(hot[0], "length")
    sched.finish(hot[1], "length")
    assert [s.seq for s in run_step(sched).scheduled] == [cold]  # a free slot: back to prefill first


def test_the_step_budget_defaults_by_device_and_an_explicit_one_stays():
    assert SchedulerConfig().for_device("cpu").max_num_batched_tokens == 512
    assert SchedulerConfig().for_device("cuda").max_num_batched_tokens == 2048
    assert SchedulerConfig(max_num_batched_tokens=64).for_device("cpu").max_num_batched_tokens == 64
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        SchedulerConfig(max_num_batched_tokens=0)


def batch_seq(n_prompt=5, max_tokens=4):
    s = seq(n_prompt, max_tokens=max_tokens)
    s.batch = True
    return s


def test_batch_lines_go_after_online_ones_and_within_their_share_while_online_work_is_live():
    sched, _, _ = make(max_num_seqs=16, batch_share=0.25, prefill_first_max_decodes=0)
    lines = [batch_seq(max_tokens=20) for _ in range(6)]
    for s in lines:
        sched.add(s)
    online = [seq(max_tokens=12) for _ in range(6)]
    for s in online:
        sched.add(s)
    out = run_step(sched)
    assert [s.seq for s in out.scheduled][:6] == online  # queued later, admitted first
    for _ in range(10):
        step = [(x.seq.batch, x.num_tokens) for x in out.scheduled]
        rows, tokens = sum(b for b, _ in step), sum(n for b, n in step if b)
        online_rows, online_tokens = len(step) - rows, sum(n for b, n in step if not b)
        assert 1 <= rows <= max(1, online_rows // 3) and tokens <= max(1, online_tokens // 3)  # 25% of the step
        out = run_step(sched)
    for s in online:
        sched.finish(s, "length")
    out = run_step(sched)  # no online work: the batch runs at full speed
    assert sum(x.seq.batch for x in out.scheduled) == 6


def test_an_online_prompt_gets_a_prefill_step_past_batch_decodes_and_a_batch_prompt_never_past_online_ones():
    sched, _, _ = make(max_num_seqs=64, prefill_first_max_decodes=2)
    lines = [batch_seq(max_tokens=20) for _ in range(8)]
    for s in lines:
        sched.add(s)
    run_step(sched)
    run_step(sched)  # eight batch lines decode
    urgent = seq()
    sched.add(urgent)
    out = run_step(sched)
    assert [x.seq for x in out.scheduled] == [urgent]  # its own prefill step, though 8 decodes wait
    run_step(sched)  # the decodes' turn
    late = batch_seq()
    sched.add(late)
    out = run_step(sched)
    assert urgent in [x.seq for x in out.scheduled]  # decoding: the batch prompt rides with it


def test_an_idle_server_runs_batch_lines_unbounded_and_preempts_them_first():
    sched, _, _ = make(num_blocks=6, block_size=4, max_num_seqs=8, prefill_first_max_decodes=0)
    lines = [batch_seq(n_prompt=7, max_tokens=8) for _ in range(2)]
    for s in lines:
        sched.add(s)
    run_step(sched)
    assert all(s.status is Status.RUNNING for s in lines)
    urgent = seq(n_prompt=7, max_tokens=8)
    sched.add(urgent)
    preempted = []
    for _ in range(12):
        preempted += run_step(sched).preempted
    assert preempted and all(s.batch for s in preempted)
