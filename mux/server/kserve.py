"""KServe v2 / Open Inference Protocol as Triton serves it, so an unmodified `tritonclient.http` works.

Every model (the base model, each adapter `<tenant>/<name>`) has one BYTES input `text_input` and one BYTES
output `text_output` of the same shape: each element is a prompt, all of them run as one batch. Generation
settings come from the request `parameters` (`max_tokens`, `temperature`, `top_p`, `top_k`, `seed`, `stop`).
Tensors travel as JSON `data` or in the binary extension (`Inference-Header-Content-Length`; BYTES elements
are `<uint32 LE length><bytes>`). Adapter ids contain a slash, so model routes match `{model:path}` and the
suffix decides: a GET ending in `/ready` or `/config` is that endpoint (`.../versions/1` reaches the metadata
of an adapter literally named `ready`).
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from mux import __version__, jsonread
from mux.engine.stream import RequestStream
from mux.errors import AdapterNotFound, DeadlineExceeded, InvalidAdapter, InvalidRequest, MuxError, Overloaded
from mux.server.auth import Caller, Forbidden, Unauthorized
from mux.server.kserve_common import (
    INPUT,
    MAX_PROMPTS,
    OUTPUT,
    VERSION,
    Models,
    check_input,
    check_output,
    config,
    decode_bytes,
    encode_bytes,
    error_message,
    metadata,
    parameters,
    prompts_of,
    sampling,
)
from mux.server.openai import (
    MAX_JSON_BYTES,
    BodyTooLarge,
    read_body,
    read_json,
    retry_after_headers,
)
from mux.server.serving import ClientGone, client_gone

_VERSIONED = re.compile(r"(.+)/versions/([^/]+)")
_STATUS = [  # Triton: INVALID_ARG (and unknown model) 400, UNAVAILABLE 503
    (Unauthorized, 401),
    (Forbidden, 403),
    (BodyTooLarge, 413),
    (AdapterNotFound, 400),
    (InvalidAdapter, 400),
    (InvalidRequest, 400),
    (Overloaded, 503),
    (DeadlineExceeded, 504),
]


def kserve_error(exc: Exception, model: str | None = None) -> JSONResponse:
    """MuxError -> Triton's `{"error": "..."}` with its status code."""
    status = next((s for cls, s in _STATUS if isinstance(exc, cls)), 500)
    headers = retry_after_headers(exc)
    return JSONResponse({"error": error_message(exc, model)}, status_code=status, headers=headers)


class KServeRoutes:
    def __init__(self, state) -> None:
        self.state = state  # ServerState: engine, auth, repository, serving
        self.models = Models(state)

    def health_routes(self) -> list[Route]:
        """Answer while the model loads (not ready yet: 400, as Triton)."""
        return [
            Route("/v2", self.server_metadata, methods=["GET"]),
            Route("/v2/health/live", self.live, methods=["GET"]),
            Route("/v2/health/ready", self.server_ready, methods=["GET"]),
        ]

    def routes(self) -> list[Route]:
        m = "/v2/models/{model:path}"
        return [  # suffix routes before the bare metadata route, which would match anything
            Route(f"{m}/ready", self.model_ready, methods=["GET"]),
            Route(f"{m}/config", self.model_config, methods=["GET"]),
            Route(f"{m}/infer", self.infer, methods=["POST"]),
            Route(f"{m}/generate", self.generate, methods=["POST"]),
            Route(f"{m}/generate_stream", self.generate_stream, methods=["POST"]),
            Route(m, self.model_metadata, methods=["GET"]),
            Route("/v2/repository/index", self.repository_index, methods=["POST"]),
            Route("/v2/repository/models/{model:path}/load", self.repository_load, methods=["POST"]),
            Route("/v2/repository/models/{model:path}/unload", self.repository_unload, methods=["POST"]),
        ]

    # -- server --
    async def server_metadata(self, request: Request) -> Response:
        extensions = ["binary_tensor_data", "model_configuration", "parameters", "generate"]
        return JSONResponse({"name": "mux", "version": __version__, "extensions": extensions})

    async def live(self, request: Request) -> Response:
        return Response(status_code=200)

    async def server_ready(self, request: Request) -> Response:
        return Response(status_code=200 if self.state.engine is not None else 400)

    # -- models --
    def _model(self, request: Request) -> tuple[Caller, str]:
        """The caller and the model named in the path, checked: it exists and the caller may use it."""
        return self.models.resolve(request.headers.get("authorization"), *_path_model(request))

    async def model_ready(self, request: Request) -> Response:
        return self._describe(request, lambda model: Response(status_code=200))

    async def model_metadata(self, request: Request) -> Response:
        return self._describe(request, lambda model: JSONResponse(metadata(model)))

    async def model_config(self, request: Request) -> Response:
        return self._describe(request, lambda model: JSONResponse(config(model)))

    async def repository_index(self, request: Request) -> Response:
        """Triton's model repository index: every model the caller may use, all READY (one version each)."""
        try:
            caller = self.state.auth.identify(request.headers.get("authorization"))
            body = await read_json(request) if int(request.headers.get("content-length") or 0) else {}
        except MuxError as e:
            return kserve_error(e)
        if not isinstance(body.get("ready", False), bool):
            return kserve_error(InvalidRequest("`ready` must be a boolean"))
        return JSONResponse([{"name": n, "version": VERSION, "state": "READY"} for n in self.models.index(caller)])

    async def repository_load(self, request: Request) -> Response:
        """Triton's model control, on an adapter: read it into the host tier now (it is served either way)."""
        try:
            await self.models.load(*self._model(request))
        except MuxError as e:
            return kserve_error(e, _path_model(request)[0])
        return Response(status_code=200)

    async def repository_unload(self, request: Request) -> Response:
        """Admin: drop an adapter from device slots and host RAM (kserve_common.Models.unload)."""
        try:
            self.models.unload(*self._model(request))
        except MuxError as e:
            return kserve_error(e, _path_model(request)[0])
        return Response(status_code=200)

    def _describe(self, request: Request, build) -> Response:
        """`build(model)` for a model the caller may use; Triton's error otherwise."""
        try:
            _, model = self._model(request)
        except MuxError as e:
            return kserve_error(e, _path_model(request)[0])
        return build(model)

    # -- inference --
    async def infer(self, request: Request) -> Response:
        served = None  # the adapter a `lora_name` parameter chose: what an unknown-model error names
        try:
            caller, model = self._model(request)
            body, binary = await _read_infer_body(request)
            prompts, shape = _input_prompts(body.get("inputs"), binary)
            params = parameters(body.get("parameters"))
            binary_outputs = _requested_outputs(body.get("outputs"), bool(params.get("binary_data_output", False)))
            served = self.models.served(model, params)
            texts, headers = await self._run(request, caller, served, prompts, params)
        except ClientGone:
            return client_gone()
        except MuxError as e:
            return kserve_error(e, served or _path_model(request)[0])
        outputs, blobs = [], []
        for binary_out in binary_outputs:
            tensor: dict = {"name": OUTPUT, "datatype": "BYTES", "shape": shape}
            if binary_out:
                raw = encode_bytes([t.encode() for t in texts])
                tensor["parameters"] = {"binary_data_size": len(raw)}
                blobs.append(raw)
            else:
                tensor["data"] = texts
            outputs.append(tensor)
        result: dict = {"model_name": model, "model_version": VERSION, "outputs": outputs}
        if isinstance(body.get("id"), str):
            result["id"] = body["id"]
        header = json.dumps(result).encode()
        if not blobs:
            return Response(header, media_type="application/json", headers=headers)
        return Response(
            header + b"".join(blobs),
            media_type="application/octet-stream",
            headers={**headers, "Inference-Header-Content-Length": str(len(header))},
        )

    async def generate(self, request: Request) -> Response:
        served = None
        try:
            caller, model = self._model(request)
            prompts, params = _generate_body(await read_json(request))
            served = self.models.served(model, params)
            texts, headers = await self._run(request, caller, served, prompts, params)
        except ClientGone:
            return client_gone()
        except MuxError as e:
            return kserve_error(e, served or _path_model(request)[0])
        output = texts[0] if len(texts) == 1 else texts  # Triton unwraps one-element outputs
        return JSONResponse({"model_name": model, "model_version": VERSION, OUTPUT: output}, headers=headers)

    async def generate_stream(self, request: Request) -> Response:
        served = None
        try:
            caller, model = self._model(request)
            prompts, params = _generate_body(await read_json(request))
            if len(prompts) != 1:
                raise InvalidRequest("generate_stream takes one `text_input`")
            served = self.models.served(model, params)
            serving = self.state.serving
            streams = await serving.submit(caller, served, prompts, sampling(params), serving.session(request))
        except MuxError as e:
            return kserve_error(e, served or _path_model(request)[0])
        return StreamingResponse(
            self._sse(model, served, streams), media_type="text/event-stream", headers=serving.headers(streams)
        )

    async def _run(
        self, request: Request, caller: Caller, model: str, prompts: list[str], params: dict
    ) -> tuple[list[str], dict]:
        """Generate every prompt as one batch: the texts in prompt order and the response headers (ClientGone if
        the client leaves)."""
        serving = self.state.serving
        streams = await serving.submit(caller, model, prompts, sampling(params), serving.session(request))
        return await serving.finish(request, streams, _texts(streams)), serving.headers(streams)

    async def _sse(self, model: str, served: str, streams) -> AsyncIterator[str]:
        """One `data: {...}` event per text delta; no [DONE] (the stream just ends); errors as `{"error"}`."""
        try:
            async for ev in streams[0]:
                if ev.text:
                    yield _event({"model_name": model, "model_version": VERSION, OUTPUT: ev.text})
        except MuxError as e:
            yield _event({"error": str(e)})
        finally:  # client gone or done: cancel whatever still runs
            self.state.serving.done(streams)


async def _texts(streams: list[RequestStream]) -> list[str]:
    return [(await s.aresult()).text for s in streams]


async def not_found(request: Request, exc: Exception) -> Response:
    """The app's 404: under /v2 Triton's JSON error (tritonclient reads `error`), else Starlette's plain text."""
    if request.url.path == "/v2" or request.url.path.startswith("/v2/"):
        return JSONResponse({"error": "Not Found"}, status_code=404)
    return PlainTextResponse("Not Found", status_code=404)


def _path_model(request: Request) -> tuple[str, str]:
    """(model, version) from `{model}` or `{model}/versions/{version}`."""
    model = request.path_params["model"]
    match = _VERSIONED.fullmatch(model)
    return (match[1], match[2]) if match else (model, VERSION)


def _event(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _read_infer_body(request: Request) -> tuple[dict, bytes]:
    """(JSON header, binary tensor data): split at Inference-Header-Content-Length when it is present."""
    raw = await read_body(request)
    declared = request.headers.get("inference-header-content-length")
    split = len(raw)
    if declared is not None:
        if not re.fullmatch(r"[0-9]{1,12}", declared) or int(declared) > len(raw):
            raise InvalidRequest(f"Inference-Header-Content-Length {declared!r} is not a length within the body")
        split = int(declared)
    body = jsonread.loads(raw[:split], "the inference request header", MAX_JSON_BYTES)
    if not isinstance(body, dict):
        raise InvalidRequest("the inference request must be a JSON object")
    return body, raw[split:]


def _input_prompts(inputs, binary: bytes) -> tuple[list[str], list[int]]:
    """The `text_input` tensor's elements (row-major) as prompts, and its shape."""
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise InvalidRequest(f"expected exactly one input tensor, '{INPUT}'")
    tensor = inputs[0]
    shape = check_input(tensor)
    size = (tensor.get("parameters") or {}).get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size != len(binary):
            raise InvalidRequest(f"binary_data_size {size!r} does not match the {len(binary)} bytes after the header")
        elements = decode_bytes(binary)
    else:
        if binary:
            raise InvalidRequest("binary data after the header, but no input has a binary_data_size")
        if "data" not in tensor:
            raise InvalidRequest(f"input '{INPUT}' has neither `data` nor a binary_data_size")
        elements = _flatten(tensor["data"])
    return prompts_of(elements, shape), shape


def _flatten(data) -> list[str]:
    """JSON tensor data, flat or nested lists, row-major; BYTES elements are strings."""
    out, todo = [], [data]
    while todo:
        item = todo.pop()
        if isinstance(item, list):
            todo.extend(reversed(item))
        elif isinstance(item, str):
            out.append(item)
        else:
            raise InvalidRequest(f"input '{INPUT}' data must be strings, got {type(item).__name__}")
    return out


def _requested_outputs(outputs, default_binary: bool) -> list[bool]:
    """For each output to return (all of them when none are named): binary or JSON."""
    if outputs is None or outputs == []:
        return [default_binary]
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise InvalidRequest("`outputs` must be a list of objects")
    flags = []
    for o in outputs:
        params = parameters(o.get("parameters"))
        check_output(o.get("name"), params)
        flags.append(bool(params.get("binary_data", default_binary)))
    return flags


def _generate_body(body: dict) -> tuple[list[str], dict]:
    """Generate extension: `text_input` is the input; every other key (and `parameters`'s) a parameter."""
    text = body.get(INPUT)
    prompts = [text] if isinstance(text, str) else text
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise InvalidRequest(f"`{INPUT}` must be a string or a list of strings")
    if len(prompts) > MAX_PROMPTS:
        raise InvalidRequest(f"at most {MAX_PROMPTS} prompts per request")
    params = {k: v for k, v in body.items() if k not in (INPUT, "parameters")}
    return prompts, {**params, **parameters(body.get("parameters"))}
