"""What KServe v2's two transports share, Triton's HTTP routes (kserve.py) and its gRPC service (grpc_service.py):
the models and their one tensor each way, the checks on a model name and on `lora_name`, the input's elements,
the repository actions, and the messages Triton's clients expect. Each transport keeps its own framing."""

from __future__ import annotations

import math
import struct
from dataclasses import replace

from starlette.concurrency import run_in_threadpool

from mux.engine.sequence import SamplingParams
from mux.errors import AdapterNotFound, InvalidRequest
from mux.server.auth import Caller
from mux.server.openai import sampling_params

INPUT, OUTPUT = "text_input", "text_output"
VERSION = "1"  # every model has one version
MAX_PROMPTS = 64  # elements of one infer request


def unknown_model(model: str | None) -> str:
    """Triton's message for a model it does not serve (tritonclient users match on it)."""
    return f"Request for unknown model: '{model}' is not found"


def error_message(exc: Exception, model: str | None) -> str:
    return unknown_model(model) if isinstance(exc, AdapterNotFound) else str(exc)


def encode_bytes(items: list[bytes]) -> bytes:
    """BYTES tensor, binary form: each element as <uint32 little-endian length><bytes>."""
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def decode_bytes(raw: bytes) -> list[bytes]:
    items, i = [], 0
    while i < len(raw):
        if i + 4 > len(raw):
            raise InvalidRequest("binary BYTES data ends inside an element's 4-byte length")
        (n,) = struct.unpack_from("<I", raw, i)
        if i + 4 + n > len(raw):
            raise InvalidRequest(f"binary BYTES element of {n} bytes runs past the end of the data")
        items.append(raw[i + 4 : i + 4 + n])
        i += 4 + n
    return items


def metadata(model: str) -> dict:
    """Model metadata, in the field names both KServe's JSON and its protobuf use."""
    return {
        "name": model,
        "versions": [VERSION],
        "platform": "mux",
        "inputs": [{"name": INPUT, "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": OUTPUT, "datatype": "BYTES", "shape": [-1]}],
    }


def config(model: str) -> dict:
    """Triton's model configuration (model_config.proto's field names)."""
    return {
        "name": model,
        "platform": "mux",
        "backend": "mux",
        "max_batch_size": 0,  # no batch dimension: any shape, every element is a prompt
        "input": [{"name": INPUT, "data_type": "TYPE_STRING", "dims": [-1]}],
        "output": [{"name": OUTPUT, "data_type": "TYPE_STRING", "dims": [-1]}],
        "model_transaction_policy": {"decoupled": False},
    }


def parameters(params) -> dict:
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise InvalidRequest("`parameters` must be an object")
    return params


def sampling(params: dict) -> SamplingParams:
    """The request parameters' generation settings: the OpenAI sampling fields, and Triton's `timeout` (whole
    microseconds, as tritonclient's `infer(timeout=...)` sends it), a deadline shorter than the server's."""
    timeout = params.get("timeout")
    if timeout is not None and (not isinstance(timeout, int) or isinstance(timeout, bool) or timeout < 1):
        raise InvalidRequest(f"`timeout` must be a whole number of microseconds ≥ 1, got {timeout!r}")
    settings = sampling_params(params)
    return settings if timeout is None else replace(settings, timeout_s=timeout / 1e6)


def check_input(tensor: dict) -> list[int]:
    """The one input's header (name, datatype, shape, parameters) checked; returns its shape."""
    if tensor.get("name") != INPUT:
        raise InvalidRequest(f"unexpected inference input '{tensor.get('name')}', the model's input is '{INPUT}'")
    if tensor.get("datatype") != "BYTES":
        raise InvalidRequest(f"input '{INPUT}' has datatype {tensor.get('datatype')!r}, expected 'BYTES'")
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise InvalidRequest(f"input '{INPUT}' needs a `shape` of non-negative integers")
    params = tensor.get("parameters") or {}
    if not isinstance(params, dict) or any(k.startswith("shared_memory") for k in params):
        raise InvalidRequest("input parameters must be an object; shared memory is not supported")
    return shape


def prompts_of(elements: list, shape: list[int]) -> list[str]:
    """The input's elements (row-major) as prompts: as many as the shape says, 1 to MAX_PROMPTS, UTF-8."""
    count = math.prod(shape)
    if len(elements) != count:
        raise InvalidRequest(f"input '{INPUT}' has {len(elements)} elements, its shape {shape} needs {count}")
    if not 1 <= count <= MAX_PROMPTS:
        raise InvalidRequest(f"input '{INPUT}' must hold 1 to {MAX_PROMPTS} prompts, got {count}")
    try:
        return [e if isinstance(e, str) else e.decode("utf-8") for e in elements]
    except UnicodeDecodeError:
        raise InvalidRequest(f"input '{INPUT}' holds bytes that are not UTF-8 text") from None


def check_output(name, params: dict) -> None:
    """A requested output: only `text_output`, neither classification nor shared memory."""
    if name != OUTPUT:
        raise InvalidRequest(f"unexpected inference output '{name}', the model's output is '{OUTPUT}'")
    if params.get("classification") or any(k.startswith("shared_memory") for k in params):
        raise InvalidRequest("classification and shared memory outputs are not supported")


class Models:
    """Model names to what serves them, for one caller: the checks every KServe call makes."""

    def __init__(self, state) -> None:
        self.state = state  # ServerState: engine, auth, repository, serving

    def resolve(self, authorization: str | None, model: str, version: str) -> tuple[Caller, str]:
        """The caller and `model` checked: the version exists, the model exists and the caller may use it."""
        if version != VERSION:
            raise InvalidRequest(f"Request for unknown model: '{model}' version {version} is not found")
        if not model:
            raise AdapterNotFound(model)
        caller = self.state.auth.identify(authorization)
        if not self.state.serving.is_base(model):
            adapter_id = self.state.auth.adapter_id(caller, model)
            self.state.auth.check(caller, adapter_id)
            self.state.repository.path(adapter_id)  # AdapterNotFound if absent
        return caller, model

    def served(self, model: str, params: dict) -> str:
        """What serves the request: the model, or on the base model the `lora_name` parameter (as Triton's vLLM
        backend takes it); never a silent fallback to the base for a name that does not resolve."""
        lora_name = params.get("lora_name")
        if lora_name is None or lora_name == model:
            return model
        if not isinstance(lora_name, str) or not lora_name:
            raise InvalidRequest("`lora_name` must be a non-empty string")
        if not self.state.serving.is_base(model):
            raise InvalidRequest(f"`lora_name` '{lora_name}' names another adapter than the model '{model}'")
        return lora_name

    def index(self, caller: Caller) -> list[str]:
        """Every model the caller may use: the base model first, then the adapters it may see."""
        ids = [a for a in self.state.repository.ids() if self.state.auth.can_use(caller, a)]
        return [self.state.base_name, *ids]

    async def load(self, caller: Caller, model: str) -> None:
        """Triton's model control, on an adapter: read it into the host tier now (it is served either way)."""
        if not self.state.serving.is_base(model):
            path = self.state.repository.path(self.state.auth.adapter_id(caller, model))
            await run_in_threadpool(self.state.engine.prepare_adapter, path)

    def unload(self, caller: Caller, model: str) -> None:
        """Admin: drop an adapter's copies from device slots and host RAM; it stays servable from disk (what
        requests hold right now stays until they end). The base model cannot be unloaded."""
        self.state.auth.require_admin(caller)
        if self.state.serving.is_base(model):
            raise InvalidRequest(f"the base model '{model}' cannot be unloaded")
        # every version's copies: a request still on an older version keeps only what it holds
        self.state.engine.adapters.forget(self.state.repository.directory(self.state.auth.adapter_id(caller, model)))
