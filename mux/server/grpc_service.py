"""Triton's KServe v2 gRPC service, `inference.GRPCInferenceService`, so an unmodified `tritonclient.grpc` works.

`mux serve --grpc-port` runs it on grpcio's asyncio server, on the HTTP server's event loop and engine, through
the one request path (serving.py) with the same keys, tenants, limits, models and tensors as the HTTP KServe
routes (kserve_common.py). `ModelStreamInfer` is Triton's decoupled streaming: one response per piece of text,
the last with `triton_final_response`, several requests of one stream running at once, each answered under its
`id`; a request's failure is a response with `error_message` (Triton's way), the stream goes on.

The messages are the stubs that ship in `tritonclient.grpc` (service_pb2, service_pb2_grpc, model_config_pb2):
Triton's own generated code for the proto its client speaks, so this server and that client cannot drift apart,
and there is no protoc step (grpcio-tools) nor a vendored .proto to keep in step.
"""

from __future__ import annotations

import asyncio
import functools
import logging

import grpc
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

from mux import __version__
from mux.config import GrpcConfig
from mux.errors import (
    AdapterNotFound,
    Conflict,
    DeadlineExceeded,
    InvalidAdapter,
    InvalidRequest,
    MuxError,
    NotFound,
    NotReady,
    Overloaded,
)
from mux.server.auth import Forbidden, Unauthorized
from mux.server.kserve_common import (
    INPUT,
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
    prompts_of,
    sampling,
)
from mux.server.serving import InternalError, report_bug

log = logging.getLogger(__name__)
Code = grpc.StatusCode
_CODES = [  # the table; NotReady before Overloaded, its base class
    (Unauthorized, Code.UNAUTHENTICATED),
    (Forbidden, Code.PERMISSION_DENIED),
    (NotFound, Code.NOT_FOUND),  # AdapterNotFound among them
    (InvalidAdapter, Code.INVALID_ARGUMENT),
    (InvalidRequest, Code.INVALID_ARGUMENT),
    (Conflict, Code.FAILED_PRECONDITION),
    (NotReady, Code.UNAVAILABLE),
    (Overloaded, Code.RESOURCE_EXHAUSTED),
    (DeadlineExceeded, Code.DEADLINE_EXCEEDED),
]
FINAL = "triton_final_response"  # on every streamed response: true on a request's last
EMPTY_FINAL = "triton_enable_empty_final_response"  # the client asks for a last response with no outputs
_LOADING = "the model is still loading"


def status_code(exc: Exception) -> grpc.StatusCode:
    """The one place MuxError maps to gRPC status codes (anything else: INTERNAL)."""
    return next((code for cls, code in _CODES if isinstance(exc, cls)), Code.INTERNAL)


async def _abort(context: grpc.aio.ServicerContext, exc: Exception, model: str | None) -> None:
    """End the call with the error's status; overload says when to retry, as HTTP's Retry-After."""
    trailing = (("retry-after", str(exc.retry_after)),) if isinstance(exc, Overloaded) else ()
    await context.abort(status_code(exc), error_message(exc, model), trailing_metadata=trailing)


class _Call:
    """One call's metadata (gRPC lowercases the keys; `Serving.session` reads `headers` as it reads HTTP's) and
    the model an unknown-model error names: the request's, or the adapter its `lora_name` chose."""

    def __init__(self, headers: dict[str, str]) -> None:
        self.headers = headers
        self.model: str | None = None

    @classmethod
    def of(cls, context: grpc.aio.ServicerContext) -> _Call:
        return cls({m.key: m.value for m in context.invocation_metadata() or () if isinstance(m.value, str)})


def _rpc(needs_engine: bool = True):
    """A unary RPC: counted, refused while the model loads, its MuxError as a status, anything else INTERNAL."""

    def wrap(method):
        @functools.wraps(method)
        async def handler(self: InferenceService, request, context):
            self.state.metrics.received("grpc")
            call = _Call.of(context)
            try:
                if needs_engine and self.state.engine is None:
                    raise NotReady(_LOADING, retry_after=5)
                return await method(self, request, call)
            except MuxError as e:
                await _abort(context, e, call.model)
            except Exception as e:  # a bug (CancelledError, a client gone, is no Exception: it passes)
                await _abort(context, self._internal(method.__name__, e), None)

        return handler

    return wrap


class InferenceService(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, state) -> None:
        self.state = state  # ServerState: engine, auth, repository, serving, metrics
        self.models = Models(state)

    # -- server --
    @_rpc(needs_engine=False)
    async def ServerLive(self, request, call: _Call):
        return service_pb2.ServerLiveResponse(live=True)

    @_rpc(needs_engine=False)
    async def ServerReady(self, request, call: _Call):
        return service_pb2.ServerReadyResponse(ready=self.state.engine is not None)

    @_rpc(needs_engine=False)
    async def ServerMetadata(self, request, call: _Call):
        extensions = ["model_configuration", "parameters"]
        return service_pb2.ServerMetadataResponse(name="mux", version=__version__, extensions=extensions)

    # -- models --
    @_rpc()
    async def ModelReady(self, request, call: _Call):
        try:
            self._resolve(call, request.name, request.version)
        except (AdapterNotFound, InvalidRequest):  # a model the caller may not use, or another version: not ready
            return service_pb2.ModelReadyResponse(ready=False)
        return service_pb2.ModelReadyResponse(ready=True)

    @_rpc()
    async def ModelMetadata(self, request, call: _Call):
        _, model = self._resolve(call, request.name, request.version)
        return json_format.ParseDict(metadata(model), service_pb2.ModelMetadataResponse())

    @_rpc()
    async def ModelConfig(self, request, call: _Call):
        _, model = self._resolve(call, request.name, request.version)
        model_config = json_format.ParseDict(config(model), model_config_pb2.ModelConfig())
        return service_pb2.ModelConfigResponse(config=model_config)

    @_rpc()
    async def RepositoryIndex(self, request, call: _Call):
        caller = self.state.auth.identify(call.headers.get("authorization"))
        models = [{"name": n, "version": VERSION, "state": "READY"} for n in self.models.index(caller)]
        return service_pb2.RepositoryIndexResponse(models=models)

    @_rpc()
    async def RepositoryModelLoad(self, request, call: _Call):
        # model_name is field 2 (field 1 is repository_name), as tritonclient sends it: the stubs say so
        if any(k == "config" or k.startswith("file:") for k in request.parameters):
            raise InvalidRequest("loading a model with a `config` or override files is not supported")
        await self.models.load(*self._resolve(call, request.model_name, VERSION))
        return service_pb2.RepositoryModelLoadResponse()

    @_rpc()
    async def RepositoryModelUnload(self, request, call: _Call):
        self.models.unload(*self._resolve(call, request.model_name, VERSION))
        return service_pb2.RepositoryModelUnloadResponse()

    # -- inference --
    @_rpc()
    async def ModelInfer(self, request, call: _Call):
        """Every element of `text_input` as one batch; the texts as `text_output` of the same shape."""
        caller, prompts, shape, params, outputs = self._parse(request, call)
        streams = await self._submit(caller, call, prompts, params)
        # a cancelled call (the client gone, its deadline passed) is a CancelledError here: `finish` frees its work
        texts = await self.state.serving.finish(None, streams, _texts(streams))
        response = _response(request, self.state.serving.headers(streams))
        raw = encode_bytes([t.encode() for t in texts])
        for _ in range(outputs):
            response.outputs.add(name=OUTPUT, datatype="BYTES", shape=shape)
            response.raw_output_contents.append(raw)
        return response

    async def ModelStreamInfer(self, request_iterator, context):
        """Read requests as they come, each generating in a task of its own; one writer sends their responses
        as they are made. The stream ends once the client has half-closed and every request has finished; a
        client that cancels or drops it cancels them all (each frees its sequences in its `finally`)."""
        call = _Call.of(context)
        try:
            if self.state.engine is None:
                raise NotReady(_LOADING, retry_after=5)
            self.state.auth.identify(call.headers.get("authorization"))  # a stream without a valid key ends here
        except MuxError as e:
            await _abort(context, e, None)
        out: asyncio.Queue = asyncio.Queue()  # responses, then None
        reader = asyncio.ensure_future(self._read(request_iterator, call.headers, out.put_nowait))
        try:
            while (response := await out.get()) is not None:
                yield response
            await reader  # the reader's own failure, if any, ends the call with it
        finally:
            reader.cancel()

    async def _read(self, requests, headers: dict[str, str], send) -> None:
        tasks: set[asyncio.Task] = set()
        try:
            async for request in requests:
                task = asyncio.ensure_future(self._generate(request, headers, send))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            send(None)

    async def _generate(self, request, headers: dict[str, str], send) -> None:
        """One request of a stream: a response per text piece, the last flagged final (or, asked for, an empty
        final response after them); its error as `error_message`."""
        self.state.metrics.received("grpc")
        call, streams = _Call(headers), []
        try:  # the engine is there: ModelStreamInfer refused the stream while the model loaded
            caller, prompts, _, params, _ = self._parse(request, call)
            if len(prompts) != 1:
                raise InvalidRequest(f"a streamed request takes one `{INPUT}` element, got {len(prompts)}")
            streams = await self._submit(caller, call, prompts, params)
            version, empty_final = self.state.serving.headers(streams), params.get(EMPTY_FINAL) is True
            async for ev in streams[0]:
                last = ev.finish_reason is not None and not empty_final
                if ev.text or last:  # the last piece may be empty (an EOS token has no text): it carries the flag
                    send(_piece(request, version, ev.text, last))
            if empty_final:
                send(service_pb2.ModelStreamInferResponse(infer_response=_response(request, version, final=True)))
        except Exception as e:
            exc = e if isinstance(e, MuxError) else self._internal("ModelStreamInfer", e)
            message = error_message(exc, call.model)
            send(service_pb2.ModelStreamInferResponse(error_message=message, infer_response=_response(request, {})))
        finally:  # cancelled with the stream, or done: free what still runs
            self.state.serving.done(streams)

    # -- the shared steps --
    def _resolve(self, call: _Call, model: str, version: str):
        call.model = model
        return self.models.resolve(call.headers.get("authorization"), model, version or VERSION)

    def _parse(self, request, call: _Call) -> tuple:
        """(caller, prompts, shape, parameters, outputs to return) of a ModelInferRequest, all checked."""
        caller, model = self._resolve(call, request.model_name, request.model_version)
        prompts, shape = _prompts(request)
        params = _values(request.parameters)
        for o in request.outputs:
            check_output(o.name, _values(o.parameters))
        call.model = self.models.served(model, params)
        return caller, prompts, shape, params, max(1, len(request.outputs))

    async def _submit(self, caller, call: _Call, prompts: list[str], params: dict):
        serving = self.state.serving
        return await serving.submit(caller, call.model, prompts, sampling(params), serving.session(call))

    def _internal(self, rpc: str, exc: Exception) -> InternalError:
        return report_bug(self.state.metrics, f"grpc {rpc}", exc, f"INTERNAL on gRPC {rpc}")


async def _texts(streams) -> list[str]:
    return [(await s.aresult()).text for s in streams]


def _values(params) -> dict:
    """A protobuf parameter map as plain values, the way the HTTP routes see their JSON `parameters`."""
    out = {}
    for key, p in params.items():
        kind = p.WhichOneof("parameter_choice")
        if kind is not None:
            out[key] = getattr(p, kind)
    return out


def _prompts(request) -> tuple[list[str], list[int]]:
    """The `text_input` elements, from `raw_input_contents` (tritonclient's way) or from `contents`."""
    if len(request.inputs) != 1:
        raise InvalidRequest(f"expected exactly one input tensor, '{INPUT}'")
    tensor = request.inputs[0]
    header = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
    shape = check_input({**header, "parameters": _values(tensor.parameters)})
    raw = request.raw_input_contents
    if len(raw) > 1:
        raise InvalidRequest(f"raw_input_contents holds {len(raw)} entries for one input")
    if raw and tensor.HasField("contents"):
        raise InvalidRequest(f"input '{INPUT}' has both `contents` and raw_input_contents")
    elements = decode_bytes(raw[0]) if raw else list(tensor.contents.bytes_contents)
    return prompts_of(elements, shape), shape


def _response(request, version: dict[str, str], final: bool | None = None):
    """A ModelInferResponse under the request's model and id, naming the adapter version that serves it (HTTP's
    `x-mux-adapter-version` header) and, on a stream, whether it is the request's last."""
    r = service_pb2.ModelInferResponse(model_name=request.model_name, model_version=VERSION, id=request.id)
    for key, value in version.items():
        r.parameters[key].int64_param = int(value)
    if final is not None:
        r.parameters[FINAL].bool_param = final
    return r


def _piece(request, version: dict[str, str], text: str, final: bool):
    r = _response(request, version, final)
    r.outputs.add(name=OUTPUT, datatype="BYTES", shape=[1])
    r.raw_output_contents.append(encode_bytes([text.encode()]))
    return service_pb2.ModelStreamInferResponse(infer_response=r)


async def start(state, grpc_config: GrpcConfig) -> grpc.aio.Server:
    """Serve on the running loop (the HTTP server's), at the HTTP server's host."""
    options = [  # responses are not bounded here: at most MAX_PROMPTS texts of a context length each
        ("grpc.max_receive_message_length", grpc_config.max_message_bytes),
        ("grpc.so_reuseport", 0),  # a port in use is an error, not silently shared with another server
    ]
    server = grpc.aio.server(options=options)
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceService(state), server)
    host = f"[{grpc_config.host}]" if ":" in grpc_config.host else grpc_config.host  # an IPv6 address
    server.add_insecure_port(f"{host}:{grpc_config.port}")  # RuntimeError if it cannot bind
    await server.start()
    log.info("gRPC (KServe v2) on %s:%d", host, grpc_config.port)
    return server


async def stop(server: grpc.aio.Server) -> None:
    """Calls still running after the grace period are cancelled: their generations end and free their blocks."""
    await server.stop(grace=2)
