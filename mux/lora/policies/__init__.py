"""Eviction policies by name. Adding one is one file: subclass EvictionPolicy and list it here."""

from __future__ import annotations

from mux.lora.policies.base import EvictionPolicy
from mux.lora.policies.cost import CostAwarePolicy
from mux.lora.policies.lfu import LFUPolicy
from mux.lora.policies.lru import LRUPolicy

POLICIES: dict[str, type[EvictionPolicy]] = {p.name: p for p in (LRUPolicy, LFUPolicy, CostAwarePolicy)}


def make_policy(name: str, tier: str) -> EvictionPolicy:
    try:
        return POLICIES[name](tier)
    except KeyError:
        raise ValueError(f"unknown eviction policy {name!r} (choose from {', '.join(POLICIES)})") from None


__all__ = ["POLICIES", "EvictionPolicy", "make_policy"]
