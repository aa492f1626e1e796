"""Least recently used: the default, as vLLM's device and host adapter caches do."""

from __future__ import annotations

from mux.lora.policies.base import EvictionPolicy, KeyStats


class LRUPolicy(EvictionPolicy):
    name = "lru"

    def score(self, s: KeyStats) -> float:
        return s.last_use
