"""Every eviction policy against one contract; the size-aware host tier. Milliseconds, no model."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from mux.lora.manager import HostCache
from mux.lora.policies import POLICIES, make_policy


@dataclass
class W:  # stands in for LoRAWeights: the host tier only needs nbytes
    nbytes: int


@pytest.fixture(params=sorted(POLICIES))
def policy_name(request):
    return request.param


def test_victim_is_always_a_candidate(policy_name):
    p = make_policy(policy_name, "device")
    for i, key in enumerate("abcde"):
        p.record_use(key, 1000 * (i + 1))
    assert p.victim([]) is None
    assert p.victim(["c"]) == "c"  # pinned adapters are simply never offered
    assert p.victim(["b", "d"]) in {"b", "d"}
    assert p.victim(["zz", "a"]) in {"zz", "a"}  # unknown keys are fine


def test_single_use_each_evicts_least_recent(policy_name):
    p = make_policy(policy_name, "host")
    for key in "abc":
        p.record_use(key, 1000)
    assert p.victim("abc") == "a"


def test_lru_order():
    p = make_policy("lru", "device")
    for key in "abcab":
        p.record_use(key, 10)
    assert p.victim("abc") == "c"


def test_lfu_keeps_frequent_over_recent():
    p = make_policy("lfu", "device")
    for key in ["a", "a", "a", "b"]:
        p.record_use(key, 10)
    assert p.victim("ab") == "b"


def test_cost_evicts_the_big_rarely_used_one_and_ages():
    p = make_policy("cost", "host")
    p.record_use("small", 1_000)
    p.record_use("big", 100_000_000)
    assert p.victim(["small", "big"]) == "big"
    for _ in range(3):
        p.record_use("old", 1_000)
    p.victim(["small"])  # clock rises to the evicted value
    p.record_use("new", 1_000)
    assert p.victim(["old", "new"]) in {"old", "new"}


def test_unknown_policy_named():
    with pytest.raises(ValueError, match="lru"):
        make_policy("fifo", "device")


def test_host_cache_bytes_and_count_bounds(policy_name):
    evicted = []
    cache = HostCache(max_bytes=1000, max_count=3, policy=make_policy(policy_name, "host"), on_evict=evicted.append)
    for i in range(6):
        cache[f"k{i}"] = W(300)
        assert cache.currsize == sum(v.nbytes for v in cache.values()) <= 1000
        assert len(cache) <= 3
    assert len(evicted) == 3 and set(evicted).isdisjoint(cache)
    cache.offer("huge", W(5000))  # larger than the tier: stays on disk only
    assert "huge" not in cache and cache.currsize <= 1000
