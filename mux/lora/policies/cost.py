"""Cost-aware (GreedyDual-Size-Frequency): value = clock + uses × reload cost / bytes held.

Reload cost is a fixed latency plus bytes over the bandwidth of the tier it comes back from: a device
slot is refilled from host RAM (fast), a host copy from disk (slow, and each read validates). The clock
rises to each victim's value, so adapters that stopped being used age out.
"""

from __future__ import annotations

from mux.lora.policies.base import EvictionPolicy, KeyStats

# seconds: fixed cost per load, and per byte, of bringing an adapter back into this tier
_RELOAD = {"device": (2e-4, 1 / 10e9), "host": (2e-3, 1 / 1e9)}


class CostAwarePolicy(EvictionPolicy):
    name = "cost"

    def __init__(self, tier: str) -> None:
        super().__init__(tier)
        self._age = 0.0

    def record_use(self, key: str, nbytes: int) -> None:
        super().record_use(key, nbytes)
        s = self.stats[key]
        fixed, per_byte = _RELOAD[self.tier]
        size = max(nbytes, 1)
        s.value = self._age + s.uses * (fixed + per_byte * size) / size * 1e9  # ns of reload per byte held

    def score(self, s: KeyStats) -> float:
        return s.value

    def evicted(self, score: float) -> None:
        self._age = max(self._age, score)
