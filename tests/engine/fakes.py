"""Fakes of the adapter manager for the scheduler's tests (no torch, no slots in memory)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class FakeAdapter:
    key: str


class FakeAdapters:
    """Slots with pins and LRU reuse, loads finishing at once unless `loading` names the key."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self.slot_of: dict[str, int] = {}
        self.refs: dict[str, int] = {}
        self.loading: set[str] = set()

    def acquire(self, ref) -> int | None:
        if ref.key not in self.slot_of:
            used = set(self.slot_of.values())
            free = [s for s in range(self.num_slots) if s not in used]
            idle = [k for k, n in self.refs.items() if n == 0]
            if free:
                slot = free[0]
            elif idle:
                slot = self.slot_of.pop(idle[0])
                del self.refs[idle[0]]
            else:
                return None
            self.slot_of[ref.key] = slot
            self.refs[ref.key] = 0
        self.refs[ref.key] += 1
        return self.slot_of[ref.key]

    def is_ready(self, key: str) -> bool:
        return key not in self.loading

    def release(self, key: str) -> None:
        self.refs[key] -= 1

    @property
    def num_pinned(self) -> int:
        return sum(1 for n in self.refs.values() if n)
