"""Per-version figures of adapters under a traffic split, and the guard that rolls a failing canary back.

Figures count since the split last changed, so a canary and its stable version are compared over the same
window; `/metrics` keeps the cumulative series (a `version` label).
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

from mux.errors import MuxError
from mux.lora.splits import Split

log = logging.getLogger(__name__)
SAMPLES = 2048  # latencies kept per version for the quantiles
MIN_STABLE_SAMPLES = 10  # the TTFT check needs this many of the stable version's first tokens


@dataclass
class Window:
    requests: int = 0
    errors: int = 0
    ttft: deque = field(default_factory=lambda: deque(maxlen=SAMPLES))  # seconds
    latency: deque = field(default_factory=lambda: deque(maxlen=SAMPLES))

    def record(self, ok: bool, ttft: float | None, latency: float | None) -> None:
        self.requests += 1
        self.errors += not ok
        if ttft is not None:
            self.ttft.append(ttft)
        if latency is not None:
            self.latency.append(latency)

    def report(self) -> dict:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "error_rate": self.errors / self.requests if self.requests else 0.0,
            "ttft_p50_s": quantile(self.ttft, 0.5),
            "ttft_p99_s": quantile(self.ttft, 0.99),
            "latency_p50_s": quantile(self.latency, 0.5),
            "latency_p99_s": quantile(self.latency, 0.99),
        }


def quantile(values, q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class VersionFigures:
    def __init__(self, repository) -> None:
        self.repository = repository
        self._windows: dict[str, tuple[float, dict[int, Window]]] = {}  # adapter id -> (split.updated, windows)

    def windows(self, adapter_id: str, split: Split) -> dict[int, Window]:
        updated, windows = self._windows.get(adapter_id, (None, {}))
        if updated != split.updated:  # the split changed: a new comparison starts
            windows = {}
            self._windows[adapter_id] = (split.updated, windows)
        return windows

    def report(self, adapter_id: str, split: Split) -> dict[str, dict]:
        windows = self.windows(adapter_id, split)
        return {str(v): windows.get(v, Window()).report() for v in sorted({*split.weights, *windows})}

    def record(self, adapter_id: str, version: int, ok: bool, ttft: float | None, latency: float | None) -> None:
        """One finished request of `adapter_id` version `version`; may roll its split back (the guard). Only
        adapters with a split keep figures here (thousands of others would be thousands of windows)."""
        split = self.repository.traffic(adapter_id)
        if split is None:
            return
        self.windows(adapter_id, split).setdefault(version, Window()).record(ok, ttft, latency)
        if split.guard is not None and version in split.canaries:
            reason = self._verdict(split, self.windows(adapter_id, split), version)
            if reason:
                self._roll_back(adapter_id, split, reason)

    @staticmethod
    def _verdict(split: Split, windows: dict[int, Window], version: int) -> str | None:
        guard, canary = split.guard, windows[version]
        if canary.requests < guard.min_requests:
            return None
        rate = canary.errors / canary.requests
        if rate > guard.max_error_rate:
            return (
                f"guard: version {version} failed {canary.errors} of {canary.requests} requests "
                f"(error rate {rate:.3f} > {guard.max_error_rate:g})"
            )
        stable = windows.get(split.stable)
        if stable is None or len(stable.ttft) < MIN_STABLE_SAMPLES or not canary.ttft:
            return None
        mine, theirs = quantile(canary.ttft, 0.99), quantile(stable.ttft, 0.99)
        if theirs > 0 and mine > guard.max_ttft_p99_ratio * theirs:
            return (
                f"guard: version {version} TTFT p99 {mine * 1000:.1f} ms > {guard.max_ttft_p99_ratio:g} x "
                f"version {split.stable}'s {theirs * 1000:.1f} ms"
            )
        return None

    def _roll_back(self, adapter_id: str, seen: Split, reason: str) -> None:
        def change(split: Split, versions: set[int]) -> Split:
            return split.rolled_back(reason) if split.updated == seen.updated else split  # someone changed it first

        try:
            self.repository.update_split(adapter_id, change)
        except (MuxError, OSError):
            log.exception("the guard could not roll %s back", adapter_id)
            return
        log.warning("rolled %s back to version %d: %s", adapter_id, seen.stable, reason)
