"""One engine replica: the whole single-server app (mux/server/) runs in-process, fed the ASGI messages the ingress
forwards; the adapters it was asked for are its `@serve.multiplexed` set, which Ray's router prefers for them."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time

from prometheus_client import generate_latest
from ray import serve
from starlette.concurrency import run_in_threadpool

from mux.errors import MuxError

log = logging.getLogger(__name__)
REPLICA_HEADER = "x-mux-replica"
REPORT_EVERY_S = 0.5


# a replica killed outright is noticed at its next health check, so checks are frequent (Ray's default: 10 s)
@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=64, health_check_period_s=2)
class MuxReplica:
    def __init__(self, args, board) -> None:
        from mux import cli
        from mux.server.app import create_app

        self.board = board
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.born = process_start()
        self.state = cli.server_state(args)
        self.app = create_app(self.state)  # its lifespan is not run: the engine is loaded here, once
        self.state.load(recover=False)  # the application's builder tidied the shared repository, once
        if self.state.engine is None:
            raise RuntimeError(f"the engine did not load: {self.state.load_error}")
        self.ready_s = time.time() - self.born
        self.first_response_s: float | None = None
        lora = self.state.engine.adapters.config

        # Ray's router prefers the replicas whose set holds a request's adapter: as many as this replica keeps
        # without a disk read. The host tier also keeps copies of adapters in slots, so that is the larger tier,
        # not the sum (sized as the sum, 4 adapters cycling through 2 slots + 2 host entries reloaded every time)
        async def load(model_id: str):  # a function: Ray keeps its cache as an attribute of it
            return await self._load(model_id)

        self.hold = serve.multiplexed(max_num_models_per_replica=max(lora.max_loras, lora.max_cpu_loras))(load)
        self.stopped = threading.Event()
        threading.Thread(target=self._report_forever, name="mux-report", daemon=True).start()

    async def _load(self, model_id: str):
        """`tenant/name@N`: read version N into the host tier (its engine keeps the tiers; this set only routes)."""
        try:
            path = self.state.repository.path(model_id)
            return await run_in_threadpool(self.state.engine.prepare_adapter, path)
        except MuxError:  # the request itself is answered by the app, in its protocol's error shape
            return None

    async def handle(self, scope: dict, body: bytes):
        """The app's ASGI messages for one request, `x-mux-replica` added to its response start."""
        model_id = serve.get_multiplexed_model_id()
        if model_id:
            await self.hold(model_id)
        async for message in asgi_messages(self.app, scope, body):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (REPLICA_HEADER.encode(), self.replica.encode())]
            elif self.first_response_s is None:
                self.first_response_s = time.time() - self.born
            yield message

    def figures(self) -> dict:
        """This replica's tiers, hits, loads, queue depth and cold start, for the ingress's /admin/stats."""
        engine, repo = self.state.engine, self.state.repository
        adapters = engine.adapters.stats()
        for a in adapters["adapters"]:
            a.update(repo.identify(a.pop("path")))
        queue = engine.stats()
        return {
            "pid": os.getpid(),
            **adapters,
            "queue": {k: queue[k] for k in ("running", "waiting")},
            "engine": {k: queue[k] for k in ("steps", "generated_tokens", "tokens_per_s", "finished")},
            "cold_start_s": {"ready": round(self.ready_s, 3), "first_response": self.first_response_s},
            "metrics": generate_latest(self.state.metrics.registry).decode(),  # the ingress's /metrics merges these
        }

    def _report_forever(self) -> None:
        while not self.stopped.wait(REPORT_EVERY_S):
            try:
                self.board.report.remote(self.replica, self.figures()).result(timeout_s=5)
            except Exception as e:  # the board restarts with the app; the next report fills it again
                log.debug("stats report failed: %s", e)

    def __del__(self) -> None:
        self.stopped.set()
        if getattr(self, "state", None) is not None and self.state.engine is not None:
            self.state.engine.stop()


def process_start() -> float:
    """When this process started (the cold start counts from there); without psutil, when the replica did."""
    try:
        import psutil  # ray[serve] brings it

        return psutil.Process().create_time()
    except ImportError:
        return time.time()


async def asgi_messages(app, scope: dict, body: bytes):
    """Run one request through an ASGI app, yielding what it sends. When the consumer stops (the client left and
    Ray cancelled this stream), the app's `receive` answers `http.disconnect`, so it cancels the generation."""
    sent: asyncio.Queue = asyncio.Queue()
    gone = asyncio.Event()
    unread = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict:
        if unread:
            return unread.pop()
        await gone.wait()
        return {"type": "http.disconnect"}

    task = asyncio.create_task(app(scope, receive, sent.put))
    task.add_done_callback(lambda _: sent.put_nowait(None))
    try:
        while (message := await sent.get()) is not None:
            yield message
        task.result()  # the app's own guard answers its errors; what escapes it is a bug to surface
    finally:
        gone.set()
