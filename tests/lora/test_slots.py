"""Device slot table: pins are never evicted, LRU among unpinned, no slot holds two adapters."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mux.lora.slots import SlotTable


def test_free_slots_first_then_lru_of_unpinned():
    t = SlotTable(2)
    a, b = t.acquire("a"), t.acquire("b")
    assert (a.slot, b.slot, a.needs_load, b.needs_load) == (0, 1, True, True)
    assert not t.can_acquire("c")  # both pinned
    t.release("b")
    t.release("a")  # a used more recently than b
    c = t.acquire("c")
    assert (c.slot, c.evicted, c.needs_load) == (1, "b", True)
    again = t.acquire("a")
    assert (again.slot, again.needs_load) == (0, False)


def test_acquire_without_slot_raises():
    t = SlotTable(1)
    t.acquire("a")
    with pytest.raises(RuntimeError):
        t.acquire("b")


def test_drop_only_unpinned():
    t = SlotTable(1)
    t.acquire("a")
    assert t.drop("a") is None
    t.release("a")
    assert t.drop("a") == 0 and t.can_acquire("b")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["acq", "rel"]), st.integers(0, 7)), max_size=80))
def test_invariants_under_random_use(ops):
    t = SlotTable(3)
    pins: dict[str, int] = {}
    for op, n in ops:
        key = f"a{n}"
        if op == "acq" and t.can_acquire(key):
            before = dict(t.slot_of)
            got = t.acquire(key)
            if got.evicted is not None:
                assert pins.get(got.evicted, 0) == 0  # never evict a pinned adapter
                assert before[got.evicted] == got.slot
            pins[key] = pins.get(key, 0) + 1
        elif op == "rel" and pins.get(key):
            t.release(key)
            pins[key] -= 1
        assert len(set(t.slot_of.values())) == len(t.slot_of) <= 3  # no slot holds two adapters
        assert all(t.refs[k] == pins[k] for k in t.refs)
        assert all(k in t.slot_of for k, n in pins.items() if n)
