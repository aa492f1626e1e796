"""Traffic splits between an adapter's versions: the state (`traffic.json` beside the versions) and the choice of
a version for one request.

A caller with a session key (OpenAI `user`, or `x-mux-session`) lands on a fixed point of [0, 10000) by a hash
of the key and the adapter id, so it keeps its version while the weights stay, and raising a canary's weight only
moves callers onto the canary (canaries take the low end of the range, the stable version the rest); a caller
without one is drawn by weight.
"""

from __future__ import annotations

import hashlib
import math
import random
import time
from dataclasses import dataclass, field, replace

from mux.errors import InvalidRequest

TRAFFIC = "traffic.json"
HISTORY = 50  # changes kept in traffic.json
_SCALE = 100  # hash points per percent


@dataclass(frozen=True, slots=True)
class Guard:
    """Roll a canary back by itself once it served `min_requests` and fails more, or is slower, than allowed."""

    max_error_rate: float = 0.05
    max_ttft_p99_ratio: float = 2.0
    min_requests: int = 50

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_error_rate <= 1.0:
            raise InvalidRequest("guard.max_error_rate must be between 0 and 1")
        if not 1.0 <= self.max_ttft_p99_ratio <= 1000.0:
            raise InvalidRequest("guard.max_ttft_p99_ratio must be between 1 and 1000")
        if not 1 <= self.min_requests <= 1_000_000:
            raise InvalidRequest("guard.min_requests must be an integer between 1 and 1000000")


@dataclass(frozen=True, slots=True)
class Split:
    weights: dict[int, int]  # version -> percent; the percents sum to 100
    stable: int  # the version the guard reverts to
    rollback_to: int  # the version `rollback` sends all traffic to: stable before the last promote or split
    guard: Guard | None = None
    rollback_reason: str | None = None
    updated: float = field(default_factory=time.time)
    history: tuple[dict, ...] = ()  # the last HISTORY changes, oldest first
    newest: int = 0  # the highest version that ever had traffic here: crash recovery keeps every version up to it

    @classmethod
    def single(cls, version: int) -> Split:
        return cls({version: 100}, version, version, updated=0.0, newest=version)

    @property
    def live(self) -> list[int]:
        """The versions that get traffic, canaries first (ascending), the stable version last."""
        others = sorted(v for v, w in self.weights.items() if w > 0 and v != self.stable)
        return others + ([self.stable] if self.weights.get(self.stable, 0) > 0 else [])

    @property
    def canaries(self) -> list[int]:
        return [v for v in self.live if v != self.stable]

    def choose(self, adapter_id: str, session: str | None) -> int:
        point = _point(adapter_id, session) if session is not None else random.randrange(100 * _SCALE)
        top = 0
        for version in self.live:
            top += self.weights[version] * _SCALE
            if point < top:
                return version
        return self.live[-1]

    # ---- changes: each returns the new state with the change in its history --------------------
    def with_weights(self, weights: dict[int, int], guard: Guard | None) -> Split:
        return self._changed("split", weights, self.stable, self.stable, guard)

    def promoted(self, version: int, action: str = "promote") -> Split:
        return self._changed(action, {version: 100}, version, self.stable, None)

    def rolled_back(self, reason: str | None = None) -> Split:
        target = self.stable if reason else self.rollback_to
        return self._changed("guard" if reason else "rollback", {target: 100}, target, target, None, reason)

    def _changed(self, action, weights, stable, rollback_to, guard, reason=None) -> Split:
        now = time.time()
        entry = {"time": now, "action": action, "weights": {str(v): w for v, w in sorted(weights.items())}}
        if reason:
            entry["reason"] = reason
        history = (*self.history, entry)[-HISTORY:]
        return replace(
            self,
            weights=dict(weights),
            stable=stable,
            rollback_to=rollback_to,
            guard=guard,
            rollback_reason=reason,
            updated=now,
            history=history,
            newest=max(self.newest, *weights),
        )

    # ---- (de)serialisation ----------------------------------------------------------------------
    def to_json(self) -> dict:
        return {
            "weights": {str(v): w for v, w in sorted(self.weights.items())},
            "stable": self.stable,
            "rollback_to": self.rollback_to,
            "guard": None if self.guard is None else _guard_json(self.guard),
            "rollback_reason": self.rollback_reason,
            "updated": self.updated,
            "history": list(self.history),
            "newest": self.newest,
        }

    @classmethod
    def from_json(cls, data: dict) -> Split:
        guard = data.get("guard")
        weights = {int(v): int(w) for v, w in data["weights"].items()}
        return cls(
            weights=weights,
            stable=int(data["stable"]),
            rollback_to=int(data["rollback_to"]),
            guard=None if guard is None else Guard(**guard),
            rollback_reason=data.get("rollback_reason"),
            updated=float(data.get("updated", 0.0)),
            history=tuple(data.get("history", ())),
            newest=int(data.get("newest", max(weights))),
        )


def parse_weights(value, versions: set[int]) -> dict[int, int]:
    """`{"1": 99, "2": 1}` from a request body: integer percents ≥ 0 summing to 100, each an existing version."""
    if not isinstance(value, dict) or not value:
        raise InvalidRequest('`weights` must be a non-empty object of version -> percent, e.g. {"1": 99, "2": 1}')
    weights: dict[int, int] = {}
    for key, weight in value.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit() and len(key) <= 9):
            raise InvalidRequest(f"`weights` keys are version numbers; got {key!r}")
        if isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= 100:
            raise InvalidRequest(f"the weight of version {key} must be an integer percent from 0 to 100")
        if int(key) not in versions:
            raise InvalidRequest(f"version {key} does not exist (versions: {sorted(versions)})")
        if int(key) in weights:
            raise InvalidRequest(f"version {int(key)} is named twice in `weights`")
        weights[int(key)] = weight
    if sum(weights.values()) != 100:
        raise InvalidRequest(f"the weights must sum to 100; they sum to {sum(weights.values())}")
    return weights


def parse_guard(value) -> Guard | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidRequest("`guard` must be an object: max_error_rate, max_ttft_p99_ratio, min_requests")
    unknown = set(value) - set(Guard.__dataclass_fields__)
    if unknown:
        raise InvalidRequest(f"unknown guard fields: {sorted(unknown)}")
    fields = {}
    for key, v in value.items():
        number = not isinstance(v, bool) and isinstance(v, int | float) and abs(v) < 1e9  # no float(10**400)
        if key == "min_requests" and not (number and isinstance(v, int)):
            raise InvalidRequest("guard.min_requests must be an integer between 1 and 1000000")
        if not (number and math.isfinite(v)):
            raise InvalidRequest(f"guard.{key} must be a number")
        fields[key] = v if key == "min_requests" else float(v)
    return Guard(**fields)


def _guard_json(guard: Guard) -> dict:
    return {k: getattr(guard, k) for k in Guard.__dataclass_fields__}


def _point(adapter_id: str, session: str) -> int:
    digest = hashlib.sha256(f"{adapter_id}\0{session}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % (100 * _SCALE)
