"""App factory: the engine loads in the background (so /health answers at once), routes mount on top."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from mux.engine.engine import Engine
from mux.errors import MuxError, NotReady
from mux.lora.repository import AdapterRepository
from mux.server.adapters import AdapterRoutes
from mux.server.admin import AdminRoutes
from mux.server.auth import Auth
from mux.server.kserve import KServeRoutes, kserve_error, not_found
from mux.server.limits import Limits
from mux.server.lorax import LoraxRoutes, lorax_error
from mux.server.metrics import Metrics
from mux.server.openai import OpenAIRoutes, error_response
from mux.server.openapi import openapi_document
from mux.server.serving import Serving

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
    ) -> None:
        self.make_engine = make_engine
        self.pinned = pinned
        self.auth = auth or Auth()
        self.allowed_lora_dirs = (Path(adapter_dir), *allowed_lora_dirs)  # for /v1/load_lora_adapter
        self.limits = limits or Limits()
        self.stream_interval = stream_interval  # OpenAI streams: tokens per chunk after the first (vLLM's flag)
        self.serving = Serving(self)
        self.metrics = Metrics(self)
        self.repository = AdapterRepository(adapter_dir)
        self.engine: Engine | None = None
        self.load_error: str | None = None
        self.ready = threading.Event()

    @property
    def base_name(self) -> str:
        return self.engine.base.name

    def load(self) -> None:
        try:
            for leftover in self.repository.recover():  # an upload interrupted by a crash never lands
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
        yield
        if state.engine is not None:
            state.engine.stop()

    async def openapi(request: Request) -> JSONResponse:
        return JSONResponse(openapi_document())

    routes = [Route("/health", health), Route("/ready", ready), Route("/openapi.json", openapi)]
    routes += kserve.health_routes()  # Triton answers health while loading (not ready: 400)
    served = [
        (openai.routes() + admin.routes() + adapters.routes() + [Route("/metrics", metrics)], error_response),
        (kserve.routes(), kserve_error),
        (lorax.routes(), lorax_error),
    ]
    routes += [
        Route(r.path, needs_engine(r.endpoint, error), methods=r.methods) for group, error in served for r in group
    ]
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers={404: not_found})
