"""The eviction policy interface: keep per-key use statistics, pick a victim among candidates (no torch)."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(slots=True)
class KeyStats:
    nbytes: int = 0
    uses: int = 0
    last_use: int = 0  # logical clock: larger = more recent
    value: float = 0.0  # policy-specific priority set on use (cost-aware)


class EvictionPolicy:
    """Subclasses override `score`: the candidate with the lowest score is evicted (ties: least recent)."""

    name = "base"

    def __init__(self, tier: str) -> None:
        self.tier = tier  # "device" or "host": what a reload from the next tier down costs differs
        self.stats: dict[str, KeyStats] = {}
        self._clock = itertools.count(1)

    def record_use(self, key: str, nbytes: int) -> None:
        s = self.stats.setdefault(key, KeyStats())
        s.nbytes = nbytes
        s.uses += 1
        s.last_use = next(self._clock)

    def victim(self, candidates: Iterable[str]) -> str | None:
        best = None
        for key in candidates:
            s = self.stats.setdefault(key, KeyStats())
            rank = (self.score(s), s.last_use)
            if best is None or rank < best[0]:
                best = (rank, key)
        if best is None:
            return None
        self.evicted(best[0][0])
        return best[1]

    def forget(self, key: str) -> None:
        self.stats.pop(key, None)

    def score(self, s: KeyStats) -> float:
        raise NotImplementedError

    def evicted(self, score: float) -> None:
        """Hook: called with the victim's score (aging policies use it)."""
