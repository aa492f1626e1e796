"""Continuous batching (no torch): each step runs every running sequence's next tokens and admits waiting ones.

Iteration-level: sequences join between steps and leave when done. A step's token budget is shared by
decodes (1 token each) and prefill chunks; KV blocks are allocated as tokens arrive, and when the cache
is full the newest running sequence is preempted (its KV freed, recomputed later). Every running sequence
holds a pinned LoRA slot, so one step never carries more distinct adapters than there are slots. A waiting
sequence reserves (pins) its slot when it gets one; the manager loads the adapter meanwhile and the sequence
is admitted once it is ready, while sequences whose adapters are resident go ahead. Across tenants admission
is fair: the tenant with the fewest running sequences goes next, and a step that admits its prompts admits none
of busier tenants' (they go in the next step), so a light tenant's first token waits for its own prompt, not for
a flood's. An admitted sequence whose first blocks are in the prefix cache (block_manager.py) starts its prefill
after them.

Prefill first (TGI's and vLLM v0's order) while few sequences decode: a step that can admit waiting sequences
runs only prefills, so a new request's first token costs one prefill forward instead of a prefill plus every
running decode. Only prompts it finishes go in it: a chunk that leaves its prompt unfinished brings no first
token sooner, so a long prompt's chunks each ride with the decodes, and the decodes wait one chunk's step at
most, not two. The decodes run in the next step whatever arrives meanwhile (they skip at most one step in
two), and past `prefill_first_max_decodes` decoding sequences every step mixes prefills and decodes, where
skipping them would cost more inter-token latency than it saves in time to first token (bench.serving). Nor
while a request waits for a slot: every running sequence pins one, so finishing them is what admits the next
request, and a skipped decode would hold each pinned slot a step longer.

Batch-job lines (`Sequence.batch`) fill the room online requests leave: they are admitted after every waiting
online request, preempted first when the cache is full, and while any online request is live they take at most
`batch_share` of a step's sequences and tokens (the others keep their KV blocks and wait). A prefill-only step
for an online prompt may skip batch lines' decodes however many there are; a batch line's prompt never gets a
prefill-only step while online sequences decode.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from mux.config import SchedulerConfig
from mux.engine.block_manager import BlockManager
from mux.engine.sequence import Sequence, Status

if TYPE_CHECKING:
    from mux.lora.manager import AdapterRef


class Adapters(Protocol):
    """What the scheduler needs of the adapter manager."""

    def acquire(self, ref: AdapterRef) -> int | None: ...
    def is_ready(self, key: str) -> bool: ...
    def release(self, key: str) -> None: ...


@dataclass(slots=True)
class Scheduled:
    seq: Sequence
    num_tokens: int  # tokens computed this step
    sample: bool  # this chunk reaches the end of the sequence: sample its next token


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[Scheduled] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)


@dataclass(slots=True)
class _Share:
    """What batch lines may add to a step: at most `share` of its sequences and of its tokens (at least one of
    each, so a batch always moves). share = 1: no bound (no online work is live)."""

    share: float
    online_rows: int = 0
    online_tokens: int = 0
    batch_rows: int = 0
    batch_tokens: int = 0

    def room(self) -> int | float:
        """Tokens the next batch line may take in this step (0: none)."""
        if self.share >= 1.0:
            return math.inf
        per_online = self.share / (1.0 - self.share)  # batch rows (tokens) per online row (token)
        rows = max(1, int(per_online * self.online_rows)) - self.batch_rows
        tokens = max(1, int(per_online * self.online_tokens)) - self.batch_tokens
        return max(0, tokens) if rows > 0 else 0

    def add(self, seq: Sequence, n: int) -> None:
        if seq.batch:
            self.batch_rows, self.batch_tokens = self.batch_rows + 1, self.batch_tokens + n
        else:
            self.online_rows, self.online_tokens = self.online_rows + 1, self.online_tokens + n


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager, adapters: Adapters) -> None:
        """`config` with its token budget filled in (SchedulerConfig.for_device)."""
        assert config.max_num_batched_tokens is not None, "SchedulerConfig.for_device fills in the budget"
        self.config = config
        self.blocks = blocks
        self.adapters = adapters
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._decodes_skipped = False  # the last step was prefill-only: this one carries the decodes
        self._slot_wait = False  # the last step left a waiting sequence without a slot (every slot pinned)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        online_decodes = sum(s.num_pending == 1 and not s.batch for s in self.running) if self.waiting else 0
        batch_decodes = sum(s.num_pending == 1 and s.batch for s in self.running) if self.waiting else 0
        # the decodes a prefill-only step would delay: an online prompt may delay batch lines' decodes freely; a
        # batch line's prompt never delays an online decode
        if any(not s.batch for s in self.waiting):
            delayed = online_decodes
        else:
            delayed = math.inf if online_decodes else batch_decodes
        tried = (
            bool(self.waiting)
            and not self._decodes_skipped
            and not self._slot_wait
            and delayed <= self.config.prefill_first_max_decodes
        )
        if tried:
            out = self._schedule(decodes=False, count_waits=True)
            if out.scheduled:
                self._decodes_skipped = online_decodes + batch_decodes > 0
                return out
        self._decodes_skipped = False
        return self._schedule(decodes=True, count_waits=not tried)

    def _schedule(self, decodes: bool, count_waits: bool) -> SchedulerOutput:
        """decodes=False: a prefill-only step (prefill chunks and admissions; it never preempts). count_waits:
        this pass counts the step for slotless waiting sequences (once per step, whichever pass runs)."""
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        self._slot_wait = False
        online = any(not s.batch for s in self.running) or any(not s.batch for s in self.waiting)
        share = _Share(self.config.batch_share if online else 1.0)

        # 1. Running sequences, online ones then batch lines (in their share), oldest first: a decode token or
        # the next prefill chunk each. A batch line left out of a step keeps its place and its KV blocks.
        for seq in sorted(self.running, key=lambda s: s.batch):
            if budget == 0:
                break
            if seq.status is not Status.RUNNING:  # preempted earlier in this loop
                continue
            n = min(seq.num_pending, budget, share.room() if seq.batch else budget)
            if n == 0:
                continue
            if not decodes and (seq.num_pending == 1 or n < seq.num_pending):
                continue  # a decode, or a chunk that leaves its prompt unfinished: it rides with the decodes
            if not decodes and not self.blocks.can_allocate(seq, n):
                return SchedulerOutput()  # the cache is full: a normal step preempts
            while not self.blocks.can_allocate(seq, n):
                victim = next((s for s in reversed(self.running) if s.batch), self.running[-1])
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                continue
            self.blocks.allocate(seq, n)
            out.scheduled.append(Scheduled(seq, n, seq.num_computed + n == seq.num_tokens))
            share.add(seq, n)
            budget -= n

        # 2. Admit waiting sequences (not in a step that had to preempt: the cache is full).
        if out.preempted:
            return out
        lightest = None  # how busy the first admitted sequence's tenant was
        for seq, busy in self._fair_waiting():
            if budget == 0 or len(self.running) >= self.config.max_num_seqs:
                break
            if lightest is not None and busy > lightest:
                continue  # a busier tenant's prompt would lengthen a lighter tenant's step: it goes in the next one
            if seq.batch and share.room() == 0:
                break  # batch lines come after every online one: none is left behind this one
            if seq.adapter is not None:
                if seq.slot < 0 and (slot := self.adapters.acquire(seq.adapter)) is not None:
                    seq.slot = slot
                if seq.slot < 0:
                    self._slot_wait = True
                    # Every slot is pinned: skip to requests whose adapter is resident, unless this one has
                    # waited too long, in which case admission stops until running sequences free a slot.
                    seq.waited_steps += count_waits
                    if seq.waited_steps > self.config.starvation_steps:
                        break
                    continue
                if not self.adapters.is_ready(seq.adapter.key):
                    continue  # its slot is loading; others go ahead
            hit = self.blocks.cached_prefix(seq)  # its first blocks' K/V, already computed
            pending = seq.num_pending - len(hit) * self.blocks.block_size
            n = min(pending, budget)
            if not self.blocks.can_allocate(seq, n, hit):
                break  # FCFS on KV space so long prompts are not starved by short ones
            if seq.batch:
                n = min(n, share.room())
            if not decodes and n < pending:
                continue  # its first token is steps away: its first chunk goes with the next step's decodes
            self.waiting.remove(seq)
            lightest = busy if lightest is None else lightest
            seq.status = Status.RUNNING
            self.running.append(seq)
            self.blocks.allocate(seq, n, hit)
            out.scheduled.append(Scheduled(seq, n, seq.num_computed + n == seq.num_tokens))
            share.add(seq, n)
            budget -= n
        return out

    def _fair_waiting(self) -> Iterator[tuple[Sequence, int]]:
        """Waiting sequences in admission order, each with its tenant's running sequences as the step began:
        online before batch lines; FIFO within a tenant; across tenants, the next one always comes from the tenant
        with the fewest sequences running, counting those taken before it (ties: the tenant that queued first), so
        a tenant flooding the queue cannot starve a light one. (One tenant waiting: plain FIFO, each with 0.)"""
        online = [s for s in self.waiting if not s.batch]
        lines = [s for s in self.waiting if s.batch] if len(online) < len(self.waiting) else []
        yield from self._fair(online)  # the caller removes those it admits from self.waiting meanwhile
        yield from self._fair(lines)

    def _fair(self, waiting: list[Sequence]) -> Iterator[tuple[Sequence, int]]:
        queues: dict[str | None, deque[Sequence]] = {}
        for seq in waiting:
            queues.setdefault(seq.tenant, deque()).append(seq)
        if len(queues) <= 1:
            yield from ((seq, 0) for seq in waiting)
            return
        start = Counter(s.tenant for s in self.running)
        load = start.copy()
        while queues:
            tenant = min(queues, key=load.__getitem__)
            queue = queues[tenant]
            yield queue.popleft(), start[tenant]
            load[tenant] += 1
            if not queue:
                del queues[tenant]

    def finish(self, seq: Sequence, reason: str) -> None:
        """Take `seq` out of the scheduler for good: free its KV blocks and its adapter pin."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = reason

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)

    def _release(self, seq: Sequence) -> None:
        self.blocks.free(seq)
        if seq.adapter is not None and seq.slot >= 0:
            self.adapters.release(seq.adapter.key)
        seq.slot = -1
