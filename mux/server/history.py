"""The server's recent past for the dashboard: one point every 2 s for the last 15 minutes, in memory only,
served at GET /admin/history (admin key). A restart starts it empty."""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from collections import deque

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from mux.errors import MuxError
from mux.server.openai import error_response

log = logging.getLogger(__name__)

INTERVAL_S = 2.0
WINDOW_S = 15 * 60
MAX_POINTS = int(WINDOW_S / INTERVAL_S)  # 450


class History:
    def __init__(self, state, interval_s: float = INTERVAL_S, max_points: int = MAX_POINTS) -> None:
        self.state = state  # ServerState: engine (None while loading), metrics, auth
        self.interval_s = interval_s
        self.points: deque[dict] = deque(maxlen=max_points)

    def sample(self) -> dict | None:
        """Append one point (None while the model loads): engine and tier counters now, TTFT since the last one."""
        engine = self.state.engine
        if engine is None:
            return None
        e = engine.stats()
        counters = engine.adapters.counters  # not stats(), which describes every adapter
        now, generated = time.time(), e["generated_tokens"]
        last = self.points[-1] if self.points else None
        rate = (generated - last["generated_tokens"]) / (now - last["t"]) if last and now > last["t"] else None
        ttfts = _drain(self.state.metrics.recent_ttft)
        point = {
            "t": now,
            "tokens_per_s": e["tokens_per_s"] if rate is None else rate,
            "generated_tokens": generated,
            "running": e["running"],
            "waiting": e["waiting"],
            "ttft_p50_s": statistics.median(ttfts) if ttfts else None,
            "ttft_count": len(ttfts),
            "loads": dict(counters["loads"]),
            "evictions": dict(counters["evictions"]),
            "faults": e["faults"],
        }
        self.points.append(point)
        return point

    async def run(self) -> None:
        """The sampler, an asyncio task of the app's lifespan: the stats it reads are the event loop's to read."""
        while True:
            try:
                self.sample()
            except Exception:  # a missed point, never a dead sampler
                log.exception("history sample failed")
            await asyncio.sleep(self.interval_s)

    async def endpoint(self, request: Request) -> Response:
        auth = self.state.auth
        try:
            auth.require_admin(auth.identify(request.headers.get("authorization")))
        except MuxError as e:
            return error_response(e)
        body = {"interval_s": self.interval_s, "max_points": self.points.maxlen, "now": time.time()}
        return JSONResponse({**body, "points": list(self.points)})


def _drain(values: deque[float]) -> list[float]:
    out = []
    while values:
        out.append(values.popleft())
    return out
