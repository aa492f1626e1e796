"""The front door: every route of the single server (mux/server/) answers here, forwarded as ASGI messages to an
engine replica chosen by Ray's router, with the request's adapter version as its `multiplexed_model_id`.
`GET /admin/stats` and `GET /metrics` are answered here from every replica's report: totals and each replica's
figures; every replica's samples with a `replica` label."""

from __future__ import annotations

import json
import re

from prometheus_client import CONTENT_TYPE_LATEST
from ray import serve
from ray.exceptions import RayActorError
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, PlainTextResponse

from mux.errors import MuxError, NotReady
from mux.lora.repository import AdapterRepository
from mux.ray.replica import REPLICA_HEADER
from mux.server.kserve import kserve_error
from mux.server.lorax import lorax_error
from mux.server.openai import BodyTooLarge, error_response

_KSERVE_MODEL = re.compile(r"/v2/models/(?P<model>.+?)(?:/versions/[^/]+)?/(?:infer|generate|generate_stream)")
_LORAX = {"/", "/generate", "/generate_stream"}
_SCOPE = ("type", "asgi", "http_version", "method", "scheme", "path", "raw_path", "query_string", "headers")
_SCOPE_TOO = ("client", "server")
MAX_BODY = 1 << 30  # uploads pass through whole; the replica's own limits apply below this


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024)
@serve.ingress()
class MuxIngress:
    def __init__(self, args, replicas, board, affinity: bool = True) -> None:
        from mux import cli

        self.auth = cli.checked_auth(args, cli.engine_setup(args)[0])
        self.repository = AdapterRepository(args.adapter_dir)
        self.base_name = args.served_model_name
        self.replicas = replicas.options(method_name="handle", stream=True)
        self.board = board
        self.affinity_routing = affinity  # off: Ray's load-only routing (bench/ray_affinity.py compares the two)

    def __serve_build_asgi_app__(self):
        async def app(scope, receive, send) -> None:  # a function: uvicorn tells ASGI 3 from 2 by its kind
            await self.asgi(scope, receive, send)

        return app

    async def asgi(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            return await _lifespan(receive, send)
        try:
            body = await _read_all(receive)
        except ClientDisconnect:
            return
        except BodyTooLarge as e:
            return await error_response(e)(scope, receive, send)
        if scope["path"] in ("/admin/stats", "/metrics") and scope["method"] == "GET":
            response = await self.stats(scope)
            response.headers[REPLICA_HEADER] = "ingress"
            return await response(scope, receive, send)
        await self.forward(scope, body, send)

    async def forward(self, scope: dict, body: bytes, send) -> None:
        """One replica's answer, relayed. A replica that dies first is a 503 (safe to retry); after the response
        began, the stream is cut (an SSE stream ends with an error event first)."""
        wire = {k: scope[k] for k in _SCOPE if k in scope} | {k: tuple(scope[k]) for k in _SCOPE_TOO if scope.get(k)}
        wire["headers"] = [tuple(h) for h in scope["headers"]]
        model_id = self.affinity(scope, body) if self.affinity_routing else ""
        stream = self.replicas.options(multiplexed_model_id=model_id).remote(wire, body)
        started, sse = False, False
        try:
            async for message in stream:
                if message["type"] == "http.response.start":
                    started = True
                    sse = (b"content-type", b"text/event-stream") in [(k, v[:17]) for k, v in message["headers"]]
                await send(message)
        except RayActorError:  # the replica died (a bug in it is a RayTaskError: 500, as on one server)
            if not started:
                return await _gone(scope)(scope, None, send)
            if sse:
                error = {"error": {"message": "the replica serving this stream died; retry", "code": 503}}
                await send({"type": "http.response.body", "body": f"data: {json.dumps(error)}\n\n".encode()})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    def affinity(self, scope: dict, body: bytes) -> str:
        """`tenant/name@N`: the adapter version this request will use, or "" (base model, or not a generation:
        any replica). Whatever cannot be resolved here goes anywhere, to be answered by the replica's own checks."""
        try:
            model = _model_named(scope, body)
            if not model or model == self.base_name:
                return ""
            headers = dict(scope["headers"])
            caller = self.auth.identify((headers.get(b"authorization") or b"").decode() or None)
            adapter_id = self.auth.adapter_id(caller, model)
            self.auth.check(caller, adapter_id.partition("@")[0])  # not theirs: load it nowhere; the replica says 404
            session = (headers.get(b"x-mux-session") or b"").decode() or None
            where = self.repository.identify(self.repository.choose(adapter_id, session))
            return f"{where['id']}@{where['version']}"
        except (MuxError, ValueError, UnicodeDecodeError, RecursionError, AttributeError, TypeError):
            return ""

    async def stats(self, scope: dict) -> JSONResponse:
        try:
            headers = dict(scope["headers"])
            self.auth.require_admin(self.auth.identify((headers.get(b"authorization") or b"").decode() or None))
        except MuxError as e:
            return error_response(e)
        replicas = await self.board.snapshot.remote()
        texts = {r: f.pop("metrics", "") for r, f in replicas.items()}
        if scope["path"] == "/metrics":
            return PlainTextResponse(merged_metrics(texts), media_type=CONTENT_TYPE_LATEST)
        return JSONResponse({"totals": totals(replicas.values()), "replicas": replicas})


def merged_metrics(texts: dict[str, str]) -> str:
    """The replicas' Prometheus texts as one: each family's HELP and TYPE once, then every replica's samples of
    it, each with a `replica` label (Prometheus sums across it as across any label)."""
    families: dict[str, list[str]] = {}  # family -> its HELP/TYPE lines, then the samples
    for replica, text in sorted(texts.items()):
        family = None
        for line in text.splitlines():
            if line.startswith("# "):
                family = line.split()[2]
                lines = families.setdefault(family, [])
                if line not in lines:
                    lines.append(line)
            elif line and family is not None:
                name, sep, rest = line.partition("{")
                label = f'replica="{replica}"'
                if sep:
                    sample = f"{name}{{{label}{'' if rest.startswith('}') else ','}{rest}"
                else:
                    name, _, value = line.partition(" ")
                    sample = f"{name}{{{label}}} {value}"
                families[family].append(sample)
    return "".join(line + "\n" for lines in families.values() for line in lines)


def totals(replicas) -> dict:
    """The replicas' counters and queue depths summed: hits, misses, loads, evictions, running and waiting."""
    out: dict = {"replicas": 0, "queue": {"running": 0, "waiting": 0}, "counters": {}}
    for r in replicas:
        out["replicas"] += 1
        for k in out["queue"]:
            out["queue"][k] += r["queue"][k]
        for name, value in r["counters"].items():
            if isinstance(value, dict):
                into = out["counters"].setdefault(name, {})
                for k, v in value.items():
                    into[k] = into.get(k, 0) + v
            else:
                out["counters"][name] = out["counters"].get(name, 0) + value
    return out


def _model_named(scope: dict, body: bytes) -> str | None:
    """The model a generation request names, by protocol: OpenAI's `model`, LoRAX's `parameters.adapter_id`,
    KServe's path."""
    path = scope["path"]
    if m := _KSERVE_MODEL.fullmatch(path):
        return m["model"]
    if scope["method"] != "POST" or not (path.startswith("/v1/") or path in _LORAX) or len(body) > 1 << 20:
        return None
    data = json.loads(body)
    if path in _LORAX:
        return (data.get("parameters") or {}).get("adapter_id")
    return data.get("model")


def _gone(scope: dict):
    """503 + Retry-After in the error shape of the request's protocol."""
    error = NotReady("the replica serving this request stopped; retry", retry_after=1)
    path = scope["path"]
    if path.startswith("/v2"):
        return kserve_error(error)
    return lorax_error(error) if path in _LORAX else error_response(error)


async def _read_all(receive) -> bytes:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > MAX_BODY:
            raise BodyTooLarge(f"request body over {MAX_BODY} bytes")
        if not message.get("more_body"):
            return b"".join(chunks)


async def _lifespan(receive, send) -> None:
    while (await receive())["type"] != "lifespan.shutdown":
        await send({"type": "lifespan.startup.complete"})
    await send({"type": "lifespan.shutdown.complete"})
