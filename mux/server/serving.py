"""The one request path every protocol shares: caller + model name -> adapter -> tenant limits -> engine.

OpenAI, KServe v2 and LoRAX routes parse their own wire format, then call `submit` and, when the response
ends (finished, failed or the client went away), `done`: a streamed response in its generator's `finally`, a
plain one through `finish`, which also watches the connection. One adapter, one name, one set of checks everywhere.
"""

from __future__ import annotations

import asyncio
import logging
import re
import traceback
from collections.abc import Awaitable
from pathlib import Path
from typing import TypeVar

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from mux.engine.sequence import SamplingParams
from mux.engine.stream import RequestStream
from mux.errors import InvalidRequest, MuxError
from mux.server.auth import Caller

log = logging.getLogger(__name__)

T = TypeVar("T")
SESSION_HEADER = "x-mux-session"
VERSION_HEADER = "x-mux-adapter-version"
_SESSION = re.compile(r"[\x21-\x7e]{1,256}")  # visible ASCII: ids, UUIDs, hashes


class ClientGone(Exception):
    """The client disconnected before its (non-streaming) response was ready."""


class InternalError(Exception):
    """What the app's last-resort guard answers for an exception no route handled (a bug): 500 in every protocol."""


def report_bug(metrics, route: str, exc: Exception, said: str) -> InternalError:
    """A bug: counted in /metrics under `route`, logged as one line (`said`, the exception's class and where it was
    raised: never its message, which may quote the request; the traceback at debug level); the error to answer."""
    metrics.internal_errors.labels(route).inc()
    frame = traceback.extract_tb(exc.__traceback__)[-1]
    log.error("%s: %s at %s:%d in %s", said, type(exc).__name__, Path(frame.filename).name, frame.lineno, frame.name)
    log.debug("the traceback of that error", exc_info=exc)
    return InternalError(f"internal server error ({type(exc).__name__}); it is logged")


def client_gone() -> Response:
    """What a handler returns for a client that left: nobody reads it; the access log says 499, as nginx does."""
    return Response(status_code=499)


class Serving:
    def __init__(self, state) -> None:
        self.state = state  # ServerState: engine, auth, repository, limits, metrics

    def is_base(self, model: str | None) -> bool:
        return not model or model == self.state.base_name

    async def submit(
        self,
        caller: Caller,
        model: str | None,
        prompts: list[str | list[int]],
        params: SamplingParams | list[SamplingParams],
        session: str | None = None,
        batch: bool = False,
    ) -> list[RequestStream]:
        """Queue one generation per prompt (params: one for all, or one each). Raises MuxError, queueing nothing.

        `model` is the base model's name (or None/"") or an adapter id: `<tenant>/<name>`, or a plain
        `<name>` meaning the caller's own tenant, either with `@N` to pin version N. Under a traffic split the
        version is drawn by weight, the same one for every request of one `session` (see `session`).
        """
        if model is not None and not isinstance(model, str):
            raise InvalidRequest("the model name must be a string")
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        engine = self.state.engine
        adapter = None
        if not self.is_base(model):
            adapter_id = self.state.auth.adapter_id(caller, model)
            self.state.auth.check(caller, adapter_id.partition("@")[0])  # another tenant's: 404, as if absent
            path = self.state.repository.choose(adapter_id, session)
            # a host-tier hit is answered here; only a read takes a worker thread, so requests for resident
            # adapters never queue for workers behind cold reads waiting on the engine's step boundary
            try:
                adapter = engine.cached_adapter(path) or await run_in_threadpool(engine.prepare_adapter, path)
            except MuxError:  # the version itself is broken: its figures (and a rollout guard) see it
                self._record(self.state.repository.identify(path), ok=False)
                raise
        limits = self.state.limits
        key = limits.admit(caller.tenant, len(prompts))  # 429 past the tenant's limits
        streams: list[RequestStream] = []
        try:
            for prompt, p in zip(prompts, params_list, strict=True):
                streams.append(engine.submit(prompt, p, adapter, tenant=key, batch=batch))
        except MuxError:
            for s in streams:
                s.cancel()
            limits.track(key, [], len(prompts))
            raise
        limits.track(key, streams, len(prompts), self.state.batch_config.token_weight if batch else 1.0)
        return streams

    def session(self, request: Request | None, user=None) -> str | None:
        """The caller's session key for sticky splits: the `x-mux-session` header, else OpenAI's `user`."""
        header = request.headers.get(SESSION_HEADER) if request is not None else None
        if header is not None:
            if not _SESSION.fullmatch(header):
                raise InvalidRequest(f"`{SESSION_HEADER}` must be 1-256 visible ASCII characters")
            return header
        if user is not None and not isinstance(user, str):
            raise InvalidRequest("`user` must be a string")
        return user or None

    def headers(self, streams: list[RequestStream]) -> dict[str, str]:
        """`x-mux-adapter-version` naming the version that serves `streams` (none for the base model)."""
        adapter = streams[0].adapter if streams else None
        if adapter is None:
            return {}
        return {VERSION_HEADER: str(self.state.repository.identify(adapter)["version"])}

    async def finish(self, request: Request | None, streams: list[RequestStream], work: Awaitable[T]) -> T:
        """Await `work` (reading `streams` to their end) for a non-streaming response, then `done`. A client that
        disconnects first raises ClientGone at once: its generations are cancelled then, not left running to
        `max_tokens` holding KV blocks and the tenant's in-flight slots for a response nobody reads. Without a
        request (a batch-job line, a gRPC call), or when the awaiting task is cancelled, the generations end with it."""
        if request is None:
            try:
                return await work
            finally:
                self.done(streams)
        task = asyncio.ensure_future(work)
        watch = asyncio.ensure_future(_disconnect(request))
        try:
            await asyncio.wait((task, watch), return_when=asyncio.FIRST_COMPLETED)
            if not task.done():
                raise ClientGone()
            return task.result()
        finally:  # cancelling a finished one does nothing
            task.cancel()
            watch.cancel()
            self.done(streams)

    def done(self, streams: list[RequestStream]) -> None:
        """The response is over: cancel what still runs (frees KV and the adapter pin), count, release limits.
        Metrics are labelled by the adapter id that served (its path in the repository), not the name as typed
        (`a1` and `acme/a1` are one adapter; two tenants' `a1` are two)."""
        for s in streams:
            if not s.finished:
                s.cancel()
        if streams:  # one request's streams share their adapter
            adapter = streams[0].adapter
            where = self.state.repository.identify(adapter) if adapter else {"id": self.state.base_name}
            self.state.metrics.observe(where["id"], where.get("version"), streams)
            if adapter:
                self._record(where, streams)
        self.state.limits.finish(streams)

    def _record(self, where: dict, streams: list[RequestStream] = (), ok: bool = True) -> None:
        """Per-version figures of adapters under a split (mux.server.versions), the guard's input."""
        if where["version"] is None:  # an adapter outside the repository
            return
        first = [s.first_token_at - s.submitted_at for s in streams if s.first_token_at is not None]
        ends = [s.finished_at - s.submitted_at for s in streams if s.finished_at is not None]
        ok = ok and not any(s.finish_reason == "error" for s in streams)
        self.state.versions.record(where["id"], where["version"], ok, min(first, default=None), max(ends, default=None))


async def _disconnect(request: Request) -> None:
    """Returns when the client disconnects; the body is read by then, so disconnect is all `receive` has left."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
