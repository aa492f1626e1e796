"""Admin routes (admin key): /admin/stats, per-adapter evict/pin/unpin, and dropping the prefix cache
(`/admin/prefix_cache/reset`, and vLLM's `/reset_prefix_cache`)."""

from __future__ import annotations

from pathlib import Path

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mux.errors import AdapterNotFound, MuxError
from mux.lora.adapter import adapter_key
from mux.server.openai import error_response
from mux.server.rollouts import rollout_state


class AdminRoutes:
    def __init__(self, state) -> None:
        self.state = state

    def routes(self) -> list[Route]:
        return [
            Route("/admin/stats", self.stats, methods=["GET"]),
            Route("/admin/adapters/{tenant}/{name}/{action}", self.act, methods=["POST"]),
            Route("/admin/prefix_cache/reset", self.reset_prefix_cache, methods=["POST"]),
            Route("/reset_prefix_cache", self.reset_prefix_cache, methods=["POST"]),
        ]

    def _admin(self, request: Request) -> None:
        self.state.auth.require_admin(self.state.auth.identify(request.headers.get("authorization")))

    async def stats(self, request: Request) -> Response:
        try:
            self._admin(request)
        except MuxError as e:
            return error_response(e)
        engine, repo = self.state.engine, self.state.repository
        s = engine.adapters.stats()
        ids = repo.ids()
        s["tiers"]["disk"] = {"count": len(ids), "bytes": sum(_size(repo.path(i)) for i in ids)}
        s["adapters"] = [
            {
                **repo.identify(a["path"]),
                **{
                    k: a[k]
                    for k in (
                        "tier",
                        "pinned",
                        "in_flight",
                        "uses",
                        "last_used",
                        "slot",
                        "rank",
                        "device_bytes",
                        "load_s",
                    )
                },
            }
            for a in s["adapters"]
        ]
        s["engine"] = engine.stats()
        s["requests_by_protocol"] = dict(self.state.metrics.protocols.counts)  # received, as /metrics counts them
        s["rollouts"] = [rollout_state(self.state, i) for i in ids if repo.traffic(i) is not None]
        s["batches"] = {**self.state.batch_jobs.stats(), "live": self.state.batch_jobs.live()}
        return JSONResponse(s)

    async def act(self, request: Request) -> Response:
        try:
            self._admin(request)
            adapter_id = f"{request.path_params['tenant']}/{request.path_params['name']}"
            action = request.path_params["action"]
            if action not in ("evict", "pin", "unpin"):
                raise AdapterNotFound(f"no admin action `{action}` (evict | pin | unpin)")
            path = self.state.repository.path(adapter_id)
            manager = self.state.engine.adapters
            if action == "pin":
                await run_in_threadpool(manager.pin, path)  # may read the adapter from disk
                done = True
            else:
                key = adapter_key(path)
                done = manager.evict(key) if action == "evict" else manager.unpin(key)
            return JSONResponse({"id": adapter_id, "action": action, "done": done})
        except MuxError as e:
            return error_response(e)

    async def reset_prefix_cache(self, request: Request) -> Response:
        try:
            self._admin(request)
        except MuxError as e:
            return error_response(e)
        forgotten = await run_in_threadpool(self.state.engine.reset_prefix_cache)  # waits for the step in flight
        return JSONResponse({"forgotten_blocks": forgotten})


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())
