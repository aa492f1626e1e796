"""App factory: the engine loads in the background (so /health answers at once), routes mount on top, a
last-resort guard answers what no route handled, and the lifespan runs the gRPC service beside (when asked)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from pathlib import Path

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.routing import Match, Route

from mux.config import GrpcConfig
from mux.engine.engine import Engine
from mux.errors import MuxError, NotReady
from mux.lora.repository import AdapterRepository
from mux.server import dashboard
from mux.server.adapters import AdapterRoutes
from mux.server.admin import AdminRoutes
from mux.server.auth import Auth
from mux.server.batch_jobs import BatchJobs
from mux.server.batch_store import BatchConfig, BatchStore
from mux.server.batches import BatchRoutes, line_executor
from mux.server.history import History
from mux.server.kserve import KServeRoutes, kserve_error, not_found
from mux.server.limits import Limits
from mux.server.lorax import LoraxRoutes, lorax_error
from mux.server.metrics import Metrics, http_protocol
from mux.server.openai import OpenAIRoutes, error_response
from mux.server.openapi import openapi_document
from mux.server.rollouts import RolloutRoutes
from mux.server.serving import Serving, client_gone, report_bug
from mux.server.versions import VersionFigures

log = logging.getLogger(__name__)


class ServerState:
    """What the routes share. `engine` is None until the model has loaded."""

    def __init__(
        self,
        make_engine: Callable[[], Engine],
        adapter_dir: Path,
        pinned: tuple[str, ...] = (),
        auth: Auth | None = None,
        allowed_lora_dirs: tuple[Path, ...] = (),
        limits: Limits | None = None,
        stream_interval: int = 1,
        batch_dir: Path | None = None,
        batch_config: BatchConfig | None = None,
        grpc: GrpcConfig | None = None,
    ) -> None:
        self.make_engine = make_engine
        self.pinned = pinned
        self.auth = auth or Auth()
        self.allowed_lora_dirs = (Path(adapter_dir), *allowed_lora_dirs)  # for /v1/load_lora_adapter
        self.limits = limits or Limits()
        self.stream_interval = stream_interval  # OpenAI streams: tokens per chunk after the first (vLLM's flag)
        self.grpc = grpc or GrpcConfig()  # port None: no gRPC service
        self.serving = Serving(self)
        self.metrics = Metrics(self)
        self.history = History(self)  # for the dashboard: sampled by the app's lifespan
        self.repository = AdapterRepository(adapter_dir)
        self.versions = VersionFigures(self.repository)
        self.batch_store = BatchStore(batch_dir or Path(adapter_dir) / ".batches")
        self.batch_config = batch_config or BatchConfig()
        self.batch_jobs: BatchJobs | None = None  # made by create_app, with the OpenAI routes its lines run through
        self.engine: Engine | None = None
        self.load_error: str | None = None
        self.ready = threading.Event()

    @property
    def base_name(self) -> str:
        return self.engine.base.name

    def load(self, recover: bool = True) -> None:
        """Build and start the engine; `recover`: first tidy what a crash left in the adapter directory (not for
        `mux batch`, which may share the directory with a running server)."""
        try:
            for leftover in self.repository.recover() if recover else ():  # an interrupted upload never lands
                log.warning("removed a leftover of an interrupted upload: %s", leftover)
            engine = self.make_engine()
            for adapter_id in self.pinned:  # policy file: keep these in device slots
                engine.adapters.pin(self.repository.path(adapter_id))
            engine.start()
            self.engine = engine
            log.info(
                "ready: %s with %d adapters in %s", self.base_name, len(self.repository.ids()), self.repository.root
            )
        except Exception as e:  # reported by /ready; the process stays up to say why
            log.exception("model load failed")
            self.load_error = str(e)
        finally:
            self.ready.set()


def create_app(state: ServerState) -> Starlette:
    openai = OpenAIRoutes(state)
    admin = AdminRoutes(state)
    adapters = AdapterRoutes(state)
    kserve = KServeRoutes(state)
    lorax = LoraxRoutes(state)
    rollouts = RolloutRoutes(state)
    batches = BatchRoutes(state)
    state.batch_jobs = BatchJobs(state.batch_store, state.batch_config, line_executor(openai))

    async def metrics(request: Request):
        try:  # every tenant's adapter ids are in here: admin key when keys are configured
            state.auth.require_admin(state.auth.identify(request.headers.get("authorization")))
        except MuxError as e:
            return error_response(e)
        return await state.metrics.endpoint(request)

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def ready(request: Request) -> JSONResponse:
        if state.engine is not None:
            return JSONResponse({"status": "ready", "model": state.base_name})
        return JSONResponse(
            {"status": "error" if state.load_error else "loading", "error": state.load_error}, status_code=503
        )

    def needs_engine(handler, error: Callable[[Exception], JSONResponse]):
        """While the model loads: 503 + Retry-After, in the error shape of the route's own protocol."""

        async def guarded(request: Request):
            if state.engine is None:
                return error(NotReady("the model is still loading", retry_after=5))
            return await handler(request)

        return guarded

    @contextlib.asynccontextmanager
    async def lifespan(app):
        threading.Thread(target=state.load, name="mux-load", daemon=True).start()
        sampler = asyncio.create_task(state.history.run())
        resumer = asyncio.create_task(resume_batches())
        grpc_server = None
        if state.grpc.port is not None:  # grpcio and Triton's stubs are imported only then
            from mux.server import grpc_service

            grpc_server = await grpc_service.start(state, state.grpc)  # this loop, this engine
        yield
        if grpc_server is not None:
            await grpc_service.stop(grpc_server)
        for task in (sampler, resumer):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await state.batch_jobs.stop()  # their lines end; the batches resume at the next start
        if state.engine is not None:
            state.engine.stop()

    async def resume_batches() -> None:
        await asyncio.to_thread(state.ready.wait)
        if state.engine is not None:
            state.batch_store.recover()
            for batch_id in state.batch_jobs.resume():
                log.info("resumed batch %s", batch_id)

    async def openapi(request: Request) -> JSONResponse:
        return JSONResponse(openapi_document())

    routes = [Route("/health", health), Route("/ready", ready), Route("/openapi.json", openapi)]
    routes += kserve.health_routes()  # Triton answers health while loading (not ready: 400)
    history = Route("/admin/history", state.history.endpoint, methods=["GET"])  # admin key, like /admin/stats
    routes += dashboard.routes()  # the page needs no key and loads while the model does; its data needs both
    served = [
        (
            openai.routes()
            + admin.routes()
            + adapters.routes()
            + rollouts.routes()
            + batches.routes()
            + [Route("/metrics", metrics), history],
            error_response,
        ),
        (kserve.routes(), kserve_error),
        (lorax.routes(), lorax_error),
    ]
    routes += [
        Route(r.path, needs_engine(r.endpoint, error), methods=r.methods) for group, error in served for r in group
    ]
    errors = {r.path: error for group, error in [*served, (kserve.health_routes(), kserve_error)] for r in group}
    guard = Middleware(LastResort, routes=routes, errors=errors, metrics=state.metrics)
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers={404: not_found}, middleware=[guard])


class LastResort:
    """ASGI middleware: an exception no route handled is a bug. It is answered 500 in the route's protocol (unless
    the response had begun: then the connection is cut), counted in /metrics by route, and logged as one line
    naming the route, the exception class and where it was raised: never the request, its body or the message,
    which may quote them (the traceback is logged at debug level)."""

    def __init__(self, app, routes: list[Route], errors: dict[str, Callable], metrics) -> None:
        self.app, self.routes, self.errors, self.metrics = app, routes, errors, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        self.metrics.received(http_protocol(scope["path"]))
        started = False

        async def watched(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except ClientDisconnect:  # the client left while its body was read: nobody to answer, nothing broken
            if not started:
                await client_gone()(scope, receive, send)
        except Exception as exc:
            route = next((r.path for r in self.routes if r.matches(scope)[0] is Match.FULL), "unrouted")
            bug = report_bug(self.metrics, route, exc, f"500 on {scope['method']} {route}")
            if not started:
                await self.errors.get(route, error_response)(bug)(scope, receive, send)
