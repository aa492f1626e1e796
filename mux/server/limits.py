"""Per-tenant admission limits from the policy file: generations in flight and tokens per minute.

Checked before anything is queued (past a limit: 429 with Retry-After); a tenant's usage is released when
its response ends. Tokens (prompt + generated) are counted over a sliding 60-second window.
"""

from __future__ import annotations

import math
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass

from mux.engine.stream import RequestStream
from mux.errors import InvalidRequest, Overloaded
from mux.server.auth import DEFAULT_TENANT

WINDOW_S = 60.0


@dataclass(frozen=True, slots=True)
class TenantLimit:
    max_concurrent: int | None = None  # generations in flight (n choices count n); None = no limit
    tokens_per_minute: int | None = None  # prompt + generated tokens over the last 60 s; None = no limit


class Limits:
    def __init__(
        self, default: TenantLimit | None = None, tenants: dict[str, TenantLimit] | None = None, clock=time.monotonic
    ) -> None:
        self.default = default or TenantLimit()
        self.tenants = tenants or {}
        self.clock = clock
        self._lock = threading.Lock()
        self._in_flight: dict[str, int] = defaultdict(int)
        self._used: dict[str, deque[tuple[float, int]]] = defaultdict(deque)  # tenant -> (time, tokens)
        self._used_total: dict[str, int] = defaultdict(int)  # tenant -> sum of its window, kept as it slides
        self._live: dict[int, tuple[str, float]] = {}  # id(stream) -> (tenant, token weight), until `finish`

    def limit(self, tenant: str | None) -> TenantLimit:
        return self.tenants.get(tenant or DEFAULT_TENANT, self.default)

    def admit(self, tenant: str | None, count: int) -> str:
        """Reserve `count` generations for `tenant` or raise Overloaded. Returns the tenant key to `track` with."""
        key, limit = tenant or DEFAULT_TENANT, self.limit(tenant)
        if limit.max_concurrent is not None and count > limit.max_concurrent:  # a retry would never pass
            raise InvalidRequest(
                f"the request asks for {count} generations; tenant `{key}` may have {limit.max_concurrent} in flight"
            )
        with self._lock:
            if limit.max_concurrent is not None and self._in_flight[key] + count > limit.max_concurrent:
                raise Overloaded(
                    f"tenant `{key}` has {self._in_flight[key]} generations in flight (limit "
                    f"{limit.max_concurrent}); retry later",
                    retry_after=1,
                )
            if limit.tokens_per_minute is not None:
                used = self._window(key)
                if used >= limit.tokens_per_minute:
                    wait = WINDOW_S - (self.clock() - self._used[key][0][0])
                    raise Overloaded(
                        f"tenant `{key}` used {used} tokens in the last minute (limit {limit.tokens_per_minute})",
                        retry_after=max(1, math.ceil(wait)),
                    )
            self._in_flight[key] += count
        return key

    def track(self, key: str, streams: list[RequestStream], reserved: int, weight: float = 1.0) -> None:
        """Attach the admitted streams (fewer than reserved if submission failed half-way); their tokens count
        `weight` times (batch-job lines: the policy's [batch] token_weight)."""
        with self._lock:
            self._in_flight[key] -= reserved - len(streams)
            for s in streams:
                self._live[id(s)] = key, weight

    def finish(self, streams: list[RequestStream]) -> None:
        """The streams' response ended: free their in-flight places and count their tokens (idempotent)."""
        now = self.clock()
        with self._lock:
            for s in streams:
                key, weight = self._live.pop(id(s), (None, 0.0))
                if key is None:
                    continue
                self._in_flight[key] -= 1
                tokens = round(weight * (len(s.prompt_ids) + s.num_tokens))
                self._used[key].append((now, tokens))
                self._used_total[key] += tokens

    def in_flight(self, tenant: str | None) -> int:
        with self._lock:
            return self._in_flight[tenant or DEFAULT_TENANT]

    def _window(self, key: str) -> int:
        used, cutoff = self._used[key], self.clock() - WINDOW_S
        while used and used[0][0] < cutoff:
            self._used_total[key] -= used.popleft()[1]
        return self._used_total[key]
