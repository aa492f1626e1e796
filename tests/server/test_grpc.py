"""KServe v2 over gRPC on a real `mux serve --grpc-port`, driven by Triton's own `tritonclient.grpc` (sync and
aio): the greedy texts equal the HTTP KServe route's for the same request, streams flag their last response and
run their requests at once, every error is its status code, and a client that leaves frees its work."""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import re
import shutil
import time
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from conftest import free_port, run_server, write_policy
from mux.errors import (
    AdapterNotFound,
    Conflict,
    DeadlineExceeded,
    InvalidAdapter,
    InvalidRequest,
    MuxError,
    NotReady,
    Overloaded,
)
from mux.server.auth import Forbidden, Unauthorized
from mux.server.grpc_service import status_code

KEYS = {"admin": "admin-secret", "acme": "acme-secret", "small": "small-secret"}
GREEDY = {"max_tokens": 6, "temperature": 0}
LONG = {"max_tokens": 500, "temperature": 0, "ignore_eos": True}  # ≈ 1 s of the tiny model alone, more with others
MAX_MESSAGE = 64 << 10  # the server's [grpc] max_message_bytes


def key(who: str = "acme") -> dict:
    return {"authorization": f"Bearer {KEYS[who]}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_dir, tiny_adapters):
    root = tmp_path_factory.mktemp("repo")
    shutil.copytree(tiny_adapters["r4-attn"], root / "acme" / "attn")
    shutil.copytree(tiny_adapters["r8-mlp"], root / "beta" / "mlp")
    for version, src in ((1, "r4-attn"), (2, "r8-qv")):  # uploaded versions: v1 stable, v2 with activate=false
        shutil.copytree(tiny_adapters[src], root / "acme" / "ver" / f"v{version}")
        meta = {"version": version, "activate": version == 1}
        (root / "acme" / "ver" / f"v{version}" / "meta.json").write_text(json.dumps(meta))
    (root / "acme" / "ver" / "current").symlink_to("v1")
    policy = tmp_path_factory.mktemp("policy") / "policy.toml"
    tail = f"[grpc]\nmax_message_bytes = {MAX_MESSAGE}\n"
    write_policy(policy, KEYS, {"small": "tokens_per_minute = 1"}, tail)
    port = free_port()
    with run_server(tiny_dir, root, "--policy", str(policy), "--max-loras", "2", "--grpc-port", str(port)) as base:
        yield base, f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def client(server):
    with triton.InferenceServerClient(server[1]) as c:
        yield c


def http(server, path: str, body: dict | None = None, who: str = "acme") -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"{server[0]}{path}", data=data, headers={"Authorization": f"Bearer {KEYS[who]}"})
    with urllib.request.urlopen(req) as r:
        return json.loads(r.read())


_HTTP_TEXTS: dict[tuple, str | list[str]] = {}


def http_text(server, model: str, prompt: str | list[str] = "Hello world", params=GREEDY):
    """The HTTP KServe generate route's answer for the same request (a list of prompts: one batch); greedy, so
    each is asked once."""
    asked = (model, json.dumps(prompt), json.dumps(params, sort_keys=True))
    if asked not in _HTTP_TEXTS:
        body = {"text_input": prompt, "parameters": params}
        _HTTP_TEXTS[asked] = http(server, f"/v2/models/{model}/generate", body)["text_output"]
    return _HTTP_TEXTS[asked]


def stats(server) -> dict:
    return http(server, "/admin/stats", who="admin")


def text_input(prompts, shape=None) -> triton.InferInput:
    arr = np.array([p.encode() for p in prompts], dtype=np.object_).reshape(shape or [len(prompts)])
    tensor = triton.InferInput("text_input", list(arr.shape), "BYTES")
    tensor.set_data_from_numpy(arr)  # raw_input_contents, as tritonclient always sends them
    return tensor


def texts(result) -> list[str]:
    return [b.decode() for b in result.as_numpy("text_output").reshape(-1)]


def params(result) -> dict:
    return {k: getattr(v, v.WhichOneof("parameter_choice")) for k, v in result.get_response().parameters.items()}


def refused(code: str, call, *args, **kwargs) -> str:
    """The message of the InferenceServerException `call` raises, checked to carry `code`."""
    with pytest.raises(InferenceServerException) as e:
        call(*args, **kwargs)
    assert e.value.status() == f"StatusCode.{code}", e.value
    return e.value.message()


def test_every_mux_error_has_its_status_code():
    expected = [
        (Unauthorized("x"), "UNAUTHENTICATED"),
        (Forbidden("x"), "PERMISSION_DENIED"),
        (AdapterNotFound("x"), "NOT_FOUND"),
        (InvalidAdapter("x"), "INVALID_ARGUMENT"),
        (InvalidRequest("x"), "INVALID_ARGUMENT"),
        (Conflict("x"), "FAILED_PRECONDITION"),
        (NotReady("x"), "UNAVAILABLE"),
        (Overloaded("x"), "RESOURCE_EXHAUSTED"),
        (DeadlineExceeded("x"), "DEADLINE_EXCEEDED"),
        (MuxError("engine step failed"), "INTERNAL"),
    ]
    assert [(type(e), status_code(e).name) for e, _ in expected] == [(type(e), c) for e, c in expected]


def test_health_metadata_config(client):
    assert client.is_server_live() and client.is_server_ready()
    assert "model_configuration" in client.get_server_metadata(as_json=True)["extensions"]
    for model in ("tiny", "acme/attn", "attn", "acme/ver@2"):  # a tenant may say its own adapters' plain names
        assert client.is_model_ready(model, headers=key())
    for model, version in (("acme/nope", ""), ("beta/mlp", ""), ("acme/attn", "2")):  # another tenant's: absent
        assert not client.is_model_ready(model, version, headers=key())
    meta = client.get_model_metadata("acme/attn", "1", headers=key(), as_json=True)
    assert meta["name"] == "acme/attn" and meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "text_input", "datatype": "BYTES", "shape": ["-1"]}]  # JSON int64: strings
    config = client.get_model_config("acme/attn", headers=key(), as_json=True)["config"]
    assert config["input"][0]["data_type"] == "TYPE_STRING" and config["output"][0]["name"] == "text_output"


def test_infer_equals_the_http_route(client, server):
    for model in ("tiny", "acme/attn"):
        result = client.infer(model, [text_input(["Hello world"])], parameters=GREEDY, headers=key())
        assert texts(result) == [http_text(server, model)] and texts(result)[0] != ""
        assert result.get_response().model_name == model
    assert "x-mux-adapter-version" not in params(
        client.infer("tiny", [text_input(["Hi"])], parameters=GREEDY, headers=key())
    )
    lora = client.infer(
        "tiny", [text_input(["Hello world"])], parameters={**GREEDY, "lora_name": "attn"}, headers=key()
    )
    assert texts(lora) == [http_text(server, "acme/attn")] != [http_text(server, "tiny")]
    assert params(lora)["x-mux-adapter-version"] == 0  # a hand-placed adapter is version 0
    prompts = ["Hello world", "The sky is", "Once upon", "1 2 3"]
    batch = client.infer("acme/attn", [text_input(prompts, [2, 2])], parameters=GREEDY, headers=key())
    assert batch.as_numpy("text_output").shape == (2, 2)
    assert texts(batch) == http_text(server, "acme/attn", prompts)


def test_version_pins_and_sessions(client, server):
    pinned = client.infer("acme/ver@2", [text_input(["Hello world"])], parameters=GREEDY, headers=key())
    assert params(pinned)["x-mux-adapter-version"] == 2 and texts(pinned) == [http_text(server, "acme/ver@2")]
    sticky = {**key(), "x-mux-session": "user-42"}
    stable = client.infer("acme/ver", [text_input(["Hello world"])], parameters=GREEDY, headers=sticky)
    assert params(stable)["x-mux-adapter-version"] == 1 and texts(stable) == [http_text(server, "acme/ver@1")]
    message = refused(
        "INVALID_ARGUMENT", client.infer, "acme/ver", [text_input(["Hi"])], headers={**key(), "x-mux-session": "a b"}
    )
    assert "x-mux-session" in message


def collect(client, requests: list[dict]) -> list[tuple[str, list, bool]]:
    """Send `requests` on one stream; (id, response parameters, text) per response, in arrival order, until
    every request has had its final response."""
    got: queue.Queue = queue.Queue()
    client.start_stream(lambda result, error: got.put((result, error)), headers=key())
    try:
        for r in requests:
            client.async_stream_infer(**r)
        out, open_ids = [], {r["request_id"] for r in requests}
        while open_ids:
            result, error = got.get(timeout=30)
            assert error is None, (error.status(), error.message(), error.debug_details())
            response, values = result.get_response(), params(result)
            arr = result.as_numpy("text_output")
            out.append((response.id, values, None if arr is None else arr[0].decode()))
            if values["triton_final_response"]:
                open_ids.discard(response.id)
        return out
    finally:
        client.stop_stream()


def test_stream_pieces_final_flag_and_concurrent_requests(client, server):
    slow = {**GREEDY, "max_tokens": 30, "ignore_eos": True}
    out = collect(
        client,
        [
            dict(model_name="acme/attn", inputs=[text_input(["Hello world"])], request_id="slow", parameters=slow),
            dict(model_name="tiny", inputs=[text_input(["Hello world"])], request_id="fast", parameters=GREEDY),
        ],
    )
    for rid, model, p in (("slow", "acme/attn", slow), ("fast", "tiny", GREEDY)):
        mine = [(values, text) for i, values, text in out if i == rid]
        assert len(mine) > 1 and [v["triton_final_response"] for v, _ in mine] == [False] * (len(mine) - 1) + [True]
        assert "".join(t for _, t in mine) == http_text(server, model, params=p)
    assert next(v.get("x-mux-adapter-version") for i, v, _ in out if i == "slow") == 0
    # sent second, it ends first: the two ran at once, not one after the other
    assert [i for i, v, _ in out if v["triton_final_response"]] == ["fast", "slow"]
    empty = collect(
        client,
        [
            dict(
                model_name="tiny",
                inputs=[text_input(["Hello world"])],
                request_id="e",
                parameters=GREEDY,
                enable_empty_final_response=True,
            )
        ],
    )
    assert empty[-1][1]["triton_final_response"] and empty[-1][2] is None  # the last: flags only, no output
    assert not any(v["triton_final_response"] for _, v, _ in empty[:-1])
    assert "".join(t for _, _, t in empty[:-1]) == http_text(server, "tiny")


def test_aio_client_and_errors_on_a_stream(server):
    async def run():
        async with triton_aio.InferenceServerClient(server[1]) as c:
            assert await c.is_server_live()
            result = await c.infer("acme/attn", [text_input(["Hello world"])], parameters=GREEDY, headers=key())

            async def requests():
                yield {"model_name": "acme/nope", "inputs": [text_input(["Hi"])], "request_id": "bad"}
                yield {"model_name": "acme/attn", "inputs": [text_input(["Hi", "Ho"])], "request_id": "two"}
                yield {
                    "model_name": "acme/attn",
                    "inputs": [text_input(["Hello world"])],
                    "request_id": "good",
                    "parameters": GREEDY,
                }

            errors, pieces = [], []
            async for res, error in c.stream_infer(requests(), headers=key()):
                if error is not None:
                    errors.append(error.message())
                    continue
                pieces.append(res.as_numpy("text_output")[0].decode())
                if res.get_response().parameters["triton_final_response"].bool_param:
                    break
            return texts(result)[0], errors, "".join(pieces)

    text, errors, streamed = asyncio.run(run())
    assert text == streamed == http_text(server, "acme/attn")  # the stream went on after its requests' errors
    assert errors == [
        "Request for unknown model: 'acme/nope' is not found",
        "a streamed request takes one `text_input` element, got 2",
    ]


def test_repository_index_load_unload(client, server):
    index = client.get_model_repository_index(headers=key(), as_json=True)["models"]
    assert {(m["name"], m["version"], m["state"]) for m in index} == {
        ("tiny", "1", "READY"),
        ("acme/attn", "1", "READY"),
        ("acme/ver", "1", "READY"),
    }  # beta/mlp is another tenant's: absent
    client.unload_model("acme/attn", headers=key("admin"))  # whatever earlier requests left in memory
    before = stats(server)["tiers"]["host"]["count"]
    client.load_model("acme/attn", headers=key())  # read into the host tier
    assert stats(server)["tiers"]["host"]["count"] == before + 1
    assert "admin" in refused("PERMISSION_DENIED", client.unload_model, "acme/attn", headers=key())
    client.unload_model("acme/attn", headers=key("admin"))
    assert stats(server)["tiers"]["host"]["count"] == before
    assert "cannot be unloaded" in refused("INVALID_ARGUMENT", client.unload_model, "tiny", headers=key("admin"))
    refused("NOT_FOUND", client.load_model, "beta/mlp", headers=key())
    # field 2 is the model's name, field 1 the repository's (ignored: one repository)
    with grpc.insecure_channel(server[1]) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        request = service_pb2.RepositoryModelLoadRequest(repository_name="elsewhere", model_name="acme/attn")
        stub.RepositoryModelLoad(request, metadata=tuple(key().items()))
    assert stats(server)["tiers"]["host"]["count"] == before + 1


def test_error_codes(client, server):
    def infer(model="acme/attn", inputs=None, headers=None, **kw):
        return client.infer(model, inputs or [text_input(["Hi"])], headers=key() if headers is None else headers, **kw)

    for model in ("acme/nope", "beta/mlp"):  # another tenant's adapter reads exactly as a missing one
        assert refused("NOT_FOUND", infer, model) == f"Request for unknown model: '{model}' is not found"
    assert "'nope'" in refused("NOT_FOUND", infer, "tiny", parameters={"lora_name": "nope"})
    wrong_type = triton.InferInput("text_input", [1], "INT32")
    wrong_type.set_data_from_numpy(np.array([1], dtype=np.int32))
    wrong_name = triton.InferInput("prompt", [1], "BYTES")
    wrong_name.set_data_from_numpy(np.array([b"Hi"], dtype=np.object_))
    for kw, words in [
        (dict(inputs=[wrong_type]), "datatype"),
        (dict(inputs=[wrong_name]), "'prompt'"),
        (dict(inputs=[text_input(["Hi", "Ho"]).set_shape([3])]), "shape"),
        (dict(outputs=[triton.InferRequestedOutput("logits")]), "'logits'"),
        (dict(parameters={"max_tokens": 0}), "max_tokens"),
        (dict(parameters={"lora_name": "ver"}), "another adapter"),
        (dict(model_version="2"), "version 2"),
    ]:
        assert words in refused("INVALID_ARGUMENT", infer, **kw), kw
    assert "missing API key" in refused("UNAUTHENTICATED", infer, headers={})
    assert "invalid API key" in refused("UNAUTHENTICATED", infer, headers={"authorization": "Bearer nope"})
    infer("tiny", headers=key("small"))  # the tenant's one token a minute: the first request passes
    assert "tokens in the last minute" in refused("RESOURCE_EXHAUSTED", infer, "tiny", headers=key("small"))
    big = text_input(["x" * MAX_MESSAGE])  # refused by gRPC itself, before any handler reads it
    refused("RESOURCE_EXHAUSTED", infer, inputs=[big])
    # Triton's request `timeout` (microseconds): a deadline shorter than the server's, the same error
    assert "within its 0.1 s deadline" in refused("DEADLINE_EXCEEDED", infer, parameters=LONG, timeout=100_000)
    with pytest.raises(urllib.error.HTTPError) as e:  # the HTTP routes read it too (tritonclient sends only ints)
        http(server, "/v2/models/tiny/generate", {"text_input": "Hi", "parameters": {"timeout": "soon"}})
    assert e.value.code == 400 and "`timeout`" in e.value.read().decode()
    got: queue.Queue = queue.Queue()  # a stream without a key is refused as a whole
    client.start_stream(lambda result, error: got.put(error))
    try:
        with contextlib.suppress(InferenceServerException):  # the stream may have ended before this send
            client.async_stream_infer("tiny", [text_input(["Hi"])])
        assert got.get(timeout=10).status() == "StatusCode.UNAUTHENTICATED"
    finally:
        client.stop_stream()


def wait_idle(server, cancelled_before: int) -> dict:
    """/admin/stats once nothing runs or waits, no adapter is in flight and one more generation counts as
    cancelled (within 5 s: the engine frees a cancelled sequence at its next step)."""
    deadline = time.monotonic() + 5
    while True:
        s = stats(server)
        engine = s["engine"]
        idle = engine["running"] == 0 and engine["waiting"] == 0 and all(a["in_flight"] == 0 for a in s["adapters"])
        if idle and engine["finished"].get("cancelled", 0) > cancelled_before:
            return s
        assert time.monotonic() < deadline, (engine, [(a["id"], a["in_flight"]) for a in s["adapters"]])
        time.sleep(0.05)


def test_a_client_that_leaves_frees_its_work(client, server):
    cancelled = stats(server)["engine"]["finished"].get("cancelled", 0)
    got: queue.Queue = queue.Queue()
    client.start_stream(lambda result, error: got.put(result), headers=key())
    client.async_stream_infer("acme/attn", [text_input(["Hello world"])], parameters=LONG, request_id="long")
    assert got.get(timeout=10) is not None  # generating
    client.stop_stream(cancel_requests=True)  # the stream dropped mid-generation
    cancelled = wait_idle(server, cancelled)["engine"]["finished"]["cancelled"]
    # a unary call whose client gives up (its deadline) is cancelled on the server too
    refused(
        "DEADLINE_EXCEEDED",
        client.infer,
        "acme/attn",
        [text_input(["Hi"])],
        parameters=LONG,
        headers=key(),
        client_timeout=0.3,
    )
    wait_idle(server, cancelled)


def test_grpc_requests_are_counted_by_protocol(client, server):
    client.infer("tiny", [text_input(["Hi"])], parameters=GREEDY, headers=key())
    counts = stats(server)["requests_by_protocol"]
    assert counts["grpc"] > 0 and counts["kserve"] > 0 and set(counts) == {"openai", "kserve", "lorax", "grpc", "other"}
    req = urllib.request.Request(f"{server[0]}/metrics", headers={"Authorization": f"Bearer {KEYS['admin']}"})
    text = urllib.request.urlopen(req).read().decode()
    found = re.search(r'^mux_protocol_requests_total\{protocol="grpc"\} ([0-9.e+]+)$', text, re.M)
    assert found and float(found[1]) >= counts["grpc"]
