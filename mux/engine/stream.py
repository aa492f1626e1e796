"""Per-request token stream handed out by `Engine.submit`: iterable from threads, async-iterable from asyncio.

The engine thread pushes events; consumers read them. No torch, no engine imports.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

from mux.errors import DeadlineExceeded, MuxError


@dataclass(frozen=True, slots=True)
class TokenEvent:
    token_id: int | None  # None for a final event that carries only text or an error
    text: str  # new text since the previous event
    logprob: float | None = None
    finish_reason: str | None = None  # set on the last event: length | stop | eos | cancelled | timeout | error
    error: str | None = None
    top: tuple[tuple[int, float], ...] | None = None  # the most likely (token id, logprob), if asked for


@dataclass(slots=True)
class Completion:
    request_id: str
    prompt_token_ids: list[int]
    adapter: str | None
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[tuple[tuple[int, float], ...] | None] = field(default_factory=list)  # per token, if asked for
    prompt_logprobs: list | None = None  # per prompt token (None for the first), if asked for
    finish_reason: str | None = None


class RequestStream:
    def __init__(
        self,
        request_id: str,
        prompt_ids: list[int],
        adapter: str | None,
        cancel: Callable[[str], None],
        pump: Callable[[], bool],
    ) -> None:
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.adapter = adapter
        self._cancel = cancel
        self._pump = pump  # runs one engine step when no engine thread is running; False if it did nothing
        self._events: deque[TokenEvent] = deque()
        self._cond = threading.Condition()
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
            self._ready = asyncio.Event()
        except RuntimeError:
            self._loop = None
        self.finished = False
        self.prompt_logprobs: list | None = None  # [PromptLogprob | None] per prompt token, if asked for
        # timings (time.monotonic) and counts, for metrics
        self.submitted_at = time.monotonic()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self.num_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens whose K/V came from the prefix cache (set when it finishes)
        self.finish_reason: str | None = None

    # -- engine side --
    def push(self, event: TokenEvent) -> None:
        with self._cond:
            self._events.append(event)
            if event.token_id is not None:
                self.num_tokens += 1
                if self.first_token_at is None:
                    self.first_token_at = time.monotonic()
            if event.finish_reason is not None:
                self.finished = True
                self.finish_reason = event.finish_reason
                self.finished_at = time.monotonic()
            self._cond.notify_all()
        if self._loop is not None:
            # RuntimeError: the consumer's loop is closed, nobody is listening any more
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._ready.set)

    # -- consumer side --
    def cancel(self) -> None:
        self._cancel(self.request_id)

    def __iter__(self) -> Iterator[TokenEvent]:
        while True:
            with self._cond:
                event = self._events.popleft() if self._events else None
            if event is None:
                if not self._pump():  # an engine thread runs (or nothing to do): wait for its push
                    with self._cond:
                        if not self._events:
                            self._cond.wait(timeout=0.1)
                continue
            yield from self._check(event)
            if event.finish_reason is not None:
                return

    async def __aiter__(self) -> AsyncIterator[TokenEvent]:
        if self._loop is None:
            raise RuntimeError("async iteration needs the stream to be submitted from a running event loop")
        while True:
            while self._events:
                event = self._events.popleft()
                for e in self._check(event):
                    yield e
                if event.finish_reason is not None:
                    return
            self._ready.clear()
            if not self._events:
                await self._ready.wait()

    def result(self) -> Completion:
        return self._collect(iter(self))

    async def aresult(self) -> Completion:
        events = [e async for e in self]
        return self._collect(iter(events))

    def _collect(self, events) -> Completion:
        c = Completion(self.request_id, self.prompt_ids, self.adapter)
        text = []
        for e in events:
            text.append(e.text)
            if e.token_id is not None:
                c.token_ids.append(e.token_id)
                c.logprobs.append(e.logprob)
                c.top.append(e.top)
            c.finish_reason = e.finish_reason
        c.text = "".join(text)
        c.prompt_logprobs = self.prompt_logprobs  # set by the engine before the first token's event
        return c

    @staticmethod
    def _check(event: TokenEvent):
        if event.finish_reason == "timeout":
            raise DeadlineExceeded(event.error)
        if event.error is not None:
            raise MuxError(event.error)
        yield event
