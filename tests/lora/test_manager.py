"""Adapter memory manager: a stateful property test over more adapters of mixed ranks than the pool holds, and
async loading."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from transformers import AutoModelForCausalLM

from mux.config import MAX_LORA_RANK, LoRAConfig
from mux.errors import InvalidAdapter
from mux.lora.adapter import load_adapter
from mux.lora.layers import MultiLoRAModel, pages_for
from mux.lora.manager import AdapterManager

SLOTS = 3  # max_loras: adapters pinned at once
PAGES = 10  # the pool: two rank-16 adapters and a rank-8 one, or ten of rank <= 4


@pytest.fixture(scope="module")
def lora_model(tiny_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    probe = MultiLoRAModel(AutoModelForCausalLM.from_pretrained(tiny_dir), 1, 16)
    return MultiLoRAModel(model, SLOTS, 16, PAGES * probe.page_bytes + probe.page_bytes - 1)


def slot_weights(lora_model, slot, module, r):
    """(A, B) of `module` as the pool holds them for `slot`'s ranks [:r]."""
    layer, rows = lora_model.layers[module], lora_model.rows(slot, r)
    return layer.lora_a[rows], layer.lora_b[rows]


@pytest.fixture(scope="module")
def reference_weights(lora_model, tiny_adapters):
    return {n: load_adapter(p, lora_model.shapes, 16) for n, p in tiny_adapters.items()}


def make_manager(lora_model, host_bytes, policy="lru", async_loading=False, host_count=1024, inline_bytes=64 << 20):
    cfg = LoRAConfig(
        max_loras=SLOTS,
        max_lora_rank=16,
        max_cpu_adapter_bytes=host_bytes,
        max_cpu_loras=host_count,
        eviction_policy=policy,
        async_loading=async_loading,
        inline_load_bytes=inline_bytes,
    )
    return AdapterManager(lora_model, cfg)


@pytest.mark.parametrize("policy", ["lru", "lfu", "cost"])
def test_random_use_keeps_invariants(lora_model, tiny_adapters, reference_weights, policy):
    names = sorted(tiny_adapters)
    sizes = sorted(w.nbytes for w in reference_weights.values())

    class Machine(RuleBasedStateMachine):
        def __init__(self):
            super().__init__()
            self.m = make_manager(lora_model, host_bytes=sizes[-1] + sizes[-2], policy=policy, host_count=3)
            self.refs = {}
            self.pins = {}  # name -> count of our acquires
            self.pinned_slot = {}  # name -> slot it had when first pinned
            self.permanent = set()

        def ref(self, name):
            if name not in self.refs:
                self.refs[name] = self.m.prepare(tiny_adapters[name])
            return self.refs[name]

        @rule(i=st.integers(0, len(names) - 1))
        def acquire(self, i):
            name = names[i]
            ref = self.ref(name)
            pinned = {k: e for k, e in self.m.entries.items() if e.refs}
            slot = self.m.acquire(ref)
            if slot is None:  # only when max_loras are pinned, or the unpinned do not free enough pages
                held = sum(len(e.pages) for e in pinned.values())
                assert self.m.num_pinned == SLOTS or (ref.key not in pinned and PAGES - held < pages_for(ref.rank))
                return
            if name in self.pinned_slot:
                assert self.pinned_slot[name] == slot
            self.pinned_slot.setdefault(name, slot)
            self.pins[name] = self.pins.get(name, 0) + 1

        @precondition(lambda self: any(self.pins.values()))
        @rule(data=st.data())
        def release(self, data):
            name = data.draw(st.sampled_from(sorted(n for n, c in self.pins.items() if c)))
            self.m.release(self.ref(name).key)
            self.pins[name] -= 1
            if not self.pins[name] and name not in self.permanent:
                del self.pinned_slot[name]

        @rule(i=st.integers(0, len(names) - 1))
        def evict(self, i):
            name = names[i]
            key = self.ref(name).key
            pinned = self.pins.get(name) or name in self.permanent
            resident = key in self.m.resident()
            assert self.m.evict(key) == (resident and not pinned)

        @rule(i=st.integers(0, len(names) - 1))
        def pin_permanently(self, i):
            name = names[i]
            if name in self.permanent:
                return
            try:
                self.m.pin(tiny_adapters[name])
            except InvalidAdapter:  # the pool is pinned full
                assert self.ref(name).key not in self.m.resident() or not self.m.entries[self.ref(name).key].refs
                return
            self.permanent.add(name)
            self.pinned_slot.setdefault(name, self.m.resident()[self.ref(name).key])

        @precondition(lambda self: self.permanent)
        @rule(data=st.data())
        def unpin(self, data):
            name = data.draw(st.sampled_from(sorted(self.permanent)))
            assert self.m.unpin(self.ref(name).key)
            self.permanent.discard(name)
            if not self.pins.get(name):
                del self.pinned_slot[name]

        @invariant()
        def consistent(self):
            resident, entries = self.m.resident(), self.m.entries
            assert self.m.num_pinned <= SLOTS
            pages = [p for e in entries.values() for p in e.pages]
            assert sorted(pages + self.m.free_pages) == list(range(PAGES))  # no page shared, none leaked
            assert sorted([*resident.values(), *self.m.free_slots]) == list(range(PAGES))
            assert all(len(e.pages) == pages_for(e.ref.rank) for e in entries.values())
            for name, slot in self.pinned_slot.items():  # pinned: never evicted, never moved
                assert resident[self.refs[name].key] == slot
            for name, ref in self.refs.items():  # what the pages hold is exactly its adapter
                if ref.key in resident:
                    for module, (a, b) in list(reference_weights[name].modules.items())[:2]:
                        got_a, got_b = slot_weights(lora_model, resident[ref.key], module, a.shape[0])
                        assert torch.equal(got_a, a) and torch.equal(got_b, b)
            host = self.m.host
            assert host.currsize == sum(w.nbytes for w in host.values()) <= host.maxsize and len(host) <= 3
            stats = self.m.stats()
            assert stats["tiers"]["device"]["used"] == len(resident)
            assert stats["tiers"]["device"]["free_bytes"] == len(self.m.free_pages) * lora_model.page_bytes
            c = stats["counters"]  # every slot fill is either still resident or was evicted
            assert c["loads"]["host_to_device"] == len(resident) + c["evictions"]["device_to_host"]
            assert c["loads"]["disk_to_host"] == c["misses"]

        def teardown(self):
            for name in list(self.permanent):
                self.m.unpin(self.refs[name].key)
            for name, count in self.pins.items():
                for _ in range(count):
                    self.m.release(self.refs[name].key)
            assert self.m.num_pinned == 0  # no leaked pins

    Machine.TestCase.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)
    Machine.TestCase().runTest()


def test_disk_loads_run_on_the_loader_thread_and_become_ready(lora_model, tiny_adapters, monkeypatch):
    m = make_manager(lora_model, host_bytes=1, async_loading=True)  # no host copy: every load reads the disk
    refs = [m.prepare(tiny_adapters[n]) for n in ("r4-attn", "r8-mlp", "r16-all")]
    gate = threading.Event()
    read_disk = m._read_disk
    monkeypatch.setattr(m, "_read_disk", lambda path: gate.wait(10) and read_disk(path))
    slots = [m.acquire(r) for r in refs]  # returns while the loader is held at the disk read
    assert None not in slots and not any(m.is_ready(r.key) for r in refs)
    gate.set()
    deadline = time.time() + 10
    while not all(m.is_ready(r.key) for r in refs) and time.time() < deadline:
        m.wait_for_load(0.05)
    assert all(m.is_ready(r.key) for r in refs)
    assert m.stats()["counters"]["loads"]["host_to_device"] == SLOTS


def test_host_tier_hit_is_ready_when_acquired(lora_model, tiny_adapters, reference_weights):
    """A host copy goes into its slot inside acquire: the request is admitted in this step, not the next."""
    m = make_manager(lora_model, host_bytes=1 << 30, async_loading=True)
    name, path = next(iter(tiny_adapters.items()))
    ref = m.prepare(path)  # reads it into the host tier
    slot = m.acquire(ref)
    assert m.is_ready(ref.key) and m.stats()["counters"]["hits"]["host"] == 1
    for module, (a, b) in reference_weights[name].modules.items():
        got_a, got_b = slot_weights(lora_model, slot, module, a.shape[0])
        assert torch.equal(got_a, a) and torch.equal(got_b, b)


def test_host_tier_hits_of_any_demo_size_are_copied_inline_by_default():
    assert LoRAConfig().inline_load_bytes >= 64 << 20  # a SmolLM2 rank-16 adapter on all targets is ~20 MB


@pytest.mark.parametrize("inline_bytes", [0, 1])  # never inline; this adapter is larger than the limit
def test_host_tier_hit_over_the_inline_limit_goes_to_the_loader(lora_model, tiny_adapters, monkeypatch, inline_bytes):
    m = make_manager(lora_model, host_bytes=1 << 30, async_loading=True, inline_bytes=inline_bytes)
    ref = m.prepare(next(iter(tiny_adapters.values())))  # in the host tier
    gate = threading.Event()
    copy = m._copy_to_device
    monkeypatch.setattr(m, "_copy_to_device", lambda entry, w, inline: gate.wait(10) and copy(entry, w, inline))
    m.acquire(ref)
    assert not m.is_ready(ref.key)  # the loader thread holds the copy
    gate.set()
    deadline = time.time() + 10
    while not m.is_ready(ref.key) and time.time() < deadline:
        m.wait_for_load(0.05)
    assert m.is_ready(ref.key) and m.stats()["counters"]["hits"]["host"] == 1


def test_negative_inline_limit_is_refused():
    with pytest.raises(ValueError, match="inline_load_bytes must be >= 0"):
        LoRAConfig(inline_load_bytes=-1)


def test_rank_bound_is_refused_above_the_limit():
    assert LoRAConfig(max_lora_rank=MAX_LORA_RANK).max_lora_rank == MAX_LORA_RANK
    with pytest.raises(ValueError, match=f"max_lora_rank must be ≤ {MAX_LORA_RANK}"):
        LoRAConfig(max_lora_rank=MAX_LORA_RANK + 1)


def test_failed_load_is_reported_and_frees_the_slot(lora_model, tiny_adapters, tmp_path):
    import shutil

    path = shutil.copytree(tiny_adapters["r4-attn"], tmp_path / "a")
    m = make_manager(lora_model, host_bytes=1, async_loading=False)  # host tier too small: load reads disk
    ref = m.prepare(path)
    (path / "adapter_model.safetensors").write_bytes(b"garbage")
    assert m.acquire(ref) is not None
    assert ref.key not in m.resident() and ref.key in m.failures and len(m.free_pages) == PAGES


def test_bookkeeping_of_cold_keys_stays_bounded(lora_model, tiny_adapters, tmp_path):
    """Many distinct adapters passing through (re-uploads, cold tenants) do not grow per-key statistics past
    twice the tiers' capacity; keys still in a tier keep theirs."""
    import shutil

    m = make_manager(lora_model, host_bytes=1 << 30, host_count=2)
    for i in range(30):
        ref = m.prepare(shutil.copytree(tiny_adapters["r4-attn"], tmp_path / f"a{i}"))
        assert m.acquire(ref) is not None
        m.release(ref.key)
    assert len(m.usage) <= 2 * (2 + SLOTS) + 1
    assert all(k in m.usage for k in [*m.host, *m.entries])
    assert len(m.device_policy.stats) <= 2 * (2 + SLOTS) + 1
