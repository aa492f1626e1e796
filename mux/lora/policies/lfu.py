"""Least frequently used (ties broken by recency): keeps the steady hot set under bursts of one-off adapters."""

from __future__ import annotations

from mux.lora.policies.base import EvictionPolicy, KeyStats


class LFUPolicy(EvictionPolicy):
    name = "lfu"

    def score(self, s: KeyStats) -> float:
        return s.uses
