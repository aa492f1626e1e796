"""Device slot table: adapter key <-> slot, reference-count pins, LRU choice among unpinned slots.

Plain Python (no torch): the engine asks it for a slot and copies the weights itself.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Acquired:
    slot: int
    needs_load: bool  # the slot does not hold this adapter yet: copy the weights in before the next forward
    evicted: str | None  # the adapter whose slot was taken, if any


class SlotTable:
    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self.slot_of: dict[str, int] = {}
        self.refs: dict[str, int] = {}
        self._free = list(range(num_slots - 1, -1, -1))  # pop() hands out slot 0 first
        self._idle: OrderedDict[str, None] = OrderedDict()  # resident, unpinned; oldest first

    def can_acquire(self, key: str) -> bool:
        return key in self.slot_of or bool(self._free) or bool(self._idle)

    def acquire(self, key: str) -> Acquired:
        """Pin `key` into a slot, taking a free slot or the least recently used unpinned one."""
        evicted = None
        if key in self.slot_of:
            needs_load = False
            self._idle.pop(key, None)
        else:
            if self._free:
                slot = self._free.pop()
            elif self._idle:
                evicted, _ = self._idle.popitem(last=False)
                slot = self.slot_of.pop(evicted)
                del self.refs[evicted]
            else:
                raise RuntimeError("no slot available: call can_acquire() first")
            self.slot_of[key] = slot
            self.refs[key] = 0
            needs_load = True
        self.refs[key] += 1
        return Acquired(self.slot_of[key], needs_load, evicted)

    def release(self, key: str) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            self._idle[key] = None  # most recently used goes last

    def drop(self, key: str) -> int | None:
        """Forget an unpinned adapter (its weights changed or it was deleted); returns the freed slot."""
        if key not in self.slot_of or self.refs[key]:
            return None
        slot = self.slot_of.pop(key)
        del self.refs[key]
        self._idle.pop(key, None)
        self._free.append(slot)
        return slot

    @property
    def num_pinned(self) -> int:
        return sum(1 for n in self.refs.values() if n)
