"""KServe v2 / Triton on a real `mux serve`, driven by Triton's own `tritonclient.http`: outputs equal the
OpenAI route's for the same greedy request; the same keys and adapter names apply."""

from __future__ import annotations

import json
import shutil
import struct
import urllib.error
import urllib.request

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from conftest import run_server, write_policy

KEYS = {"admin": "admin-secret", "acme": "acme-secret"}


def acme() -> dict:
    """A fresh header dict each call: tritonclient adds its own headers to the dict it is given."""
    return {"Authorization": f"Bearer {KEYS['acme']}"}


GREEDY = {"max_tokens": 6, "temperature": 0}


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_dir, tiny_adapters):
    root = tmp_path_factory.mktemp("repo")
    for tenant, name, src in [("acme", "attn", "r4-attn"), ("acme", "ready", "r8-mlp"), ("beta", "mlp", "r8-mlp")]:
        shutil.copytree(tiny_adapters[src], root / tenant / name)
    policy = tmp_path_factory.mktemp("policy") / "policy.toml"
    write_policy(policy, KEYS)
    with run_server(tiny_dir, root, "--policy", str(policy), "--max-loras", "2") as base:
        yield base


@pytest.fixture(scope="module")
def client(server):
    return triton.InferenceServerClient(url=server.removeprefix("http://"))


def post(server, path, body, headers=None) -> tuple[int, dict, bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(f"{server}{path}", data=data, method="POST", headers=headers or acme())
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def openai_texts(server, model, prompts) -> list[str]:
    """The OpenAI route's answers for the same greedy request, in prompt order."""
    status, _, raw = post(server, "/v1/completions", {"model": model, "prompt": prompts, **GREEDY})
    assert status == 200, raw
    return [c["text"] for c in sorted(json.loads(raw)["choices"], key=lambda c: c["index"])]


def text_input(prompts, binary=True, shape=None) -> triton.InferInput:
    arr = np.array([p.encode() for p in prompts], dtype=np.object_).reshape(shape or [len(prompts)])
    tensor = triton.InferInput("text_input", list(arr.shape), "BYTES")
    tensor.set_data_from_numpy(arr, binary_data=binary)
    return tensor


def test_health_metadata_config(client):
    assert client.is_server_live() and client.is_server_ready()
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    for model in ("tiny", "acme/attn", "attn"):  # a tenant may say its own adapters' plain names
        assert client.is_model_ready(model, headers=acme())
    meta = client.get_model_metadata("acme/attn", headers=acme())
    assert meta["name"] == "acme/attn" and meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "text_input", "datatype": "BYTES", "shape": [-1]}]
    assert meta["outputs"] == [{"name": "text_output", "datatype": "BYTES", "shape": [-1]}]
    assert client.get_model_config("acme/attn", headers=acme())["input"][0]["data_type"] == "TYPE_STRING"
    # `.../ready` is the readiness endpoint; the adapter named `ready` is reached through its version
    assert client.get_model_metadata("acme/ready", "1", headers=acme())["name"] == "acme/ready"
    assert client.is_model_ready("acme/attn", "1", headers=acme())
    assert not client.is_model_ready("acme/attn", "2", headers=acme())


def test_repository_index_lists_what_the_caller_may_use(client, server):
    index = client.get_model_repository_index(headers=acme())
    assert {(m["name"], m["version"], m["state"]) for m in index} == {
        ("tiny", "1", "READY"),
        ("acme/attn", "1", "READY"),
        ("acme/ready", "1", "READY"),
    }  # beta/mlp is another tenant's: absent
    assert post(server, "/v2/repository/index", {"ready": "yes"})[0] == 400


def test_model_control_loads_and_unloads_adapters_memory(client, server):
    admin = {"Authorization": f"Bearer {KEYS['admin']}"}

    def host_count() -> int:
        req = urllib.request.Request(f"{server}/admin/stats", headers=admin)
        return json.loads(urllib.request.urlopen(req).read())["tiers"]["host"]["count"]

    client.unload_model("acme/attn", headers=admin)  # whatever earlier requests left in memory
    before = host_count()
    client.load_model("acme/attn", headers=acme())  # read into the host tier
    assert host_count() == before + 1
    with pytest.raises(InferenceServerException, match="admin"):
        client.unload_model("acme/attn", headers=acme())
    client.unload_model("acme/attn", headers=admin)
    assert host_count() == before
    assert client.is_model_ready("acme/attn", headers=acme())  # still served, from disk on the next request
    with pytest.raises(InferenceServerException):
        client.load_model("beta/mlp", headers=acme())  # another tenant's: unknown
    with pytest.raises(InferenceServerException, match="cannot be unloaded"):
        client.unload_model("tiny", headers=admin)


def test_unmatched_v2_urls_are_json_404s(server):
    for path in ("/v2/nope", "/v2/repository/models", "/v2/repository/models/tiny/explain"):
        status, headers, raw = post(server, path, {})
        assert (
            status == 404
            and headers["content-type"] == "application/json"
            and json.loads(raw) == {"error": "Not Found"}
        ), path


def test_infer_binary_equals_openai(client, server):
    for model in ("tiny", "acme/attn"):  # an adapter id with its slash, straight in the URL
        result = client.infer(model, [text_input(["Hello world"])], parameters=GREEDY, headers=acme())
        out = result.as_numpy("text_output")  # binary output (the client's default): bytes elements
        assert out.shape == (1,) and isinstance(out[0], bytes)
        assert out[0].decode() == openai_texts(server, model, ["Hello world"])[0] != ""
        assert result.get_response()["model_name"] == model


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_requests_from_tritonclient(client, server, algorithm):
    result = client.infer(
        "acme/attn",
        [text_input(["Hello world"])],
        parameters=GREEDY,
        headers=acme(),
        request_compression_algorithm=algorithm,
        response_compression_algorithm=algorithm,
    )
    assert result.as_numpy("text_output")[0].decode() == openai_texts(server, "acme/attn", ["Hello world"])[0]


def test_a_compression_bomb_is_413(server):
    import gzip

    from mux.server.openai import MAX_JSON_BYTES

    bomb = gzip.compress(b" " * (MAX_JSON_BYTES + 1))  # a few KB on the wire
    status, _, raw = post(server, "/v2/models/tiny/infer", bomb, {**acme(), "Content-Encoding": "gzip"})
    assert status == 413 and "once decompressed" in json.loads(raw)["error"]


def test_infer_json_only(client, server):
    outputs = [triton.InferRequestedOutput("text_output", binary_data=False)]
    result = client.infer(
        "acme/attn", [text_input(["Hello world"], binary=False)], outputs=outputs, parameters=GREEDY, headers=acme()
    )
    response = result.get_response()
    assert response["outputs"][0]["data"] == openai_texts(server, "acme/attn", ["Hello world"])
    assert "binary_data_size" not in response["outputs"][0].get("parameters", {})


def test_multi_prompt_batch(client, server):
    prompts = ["Hello world", "The sky is", "Once upon", "1 2 3"]
    result = client.infer("acme/attn", [text_input(prompts, shape=[2, 2])], parameters=GREEDY, headers=acme())
    out = result.as_numpy("text_output")
    assert out.shape == (2, 2)
    assert [b.decode() for b in out.reshape(-1)] == openai_texts(server, "acme/attn", prompts)


def test_unknown_model_and_other_tenants_adapter(client):
    for model in ("acme/nope", "beta/mlp"):  # another tenant's adapter looks exactly like a missing one
        with pytest.raises(InferenceServerException) as e:
            client.infer(model, [text_input(["Hi"])], parameters=GREEDY, headers=acme())
        assert e.value.status() == "400"
        assert e.value.message() == f"Request for unknown model: '{model}' is not found"
        assert not client.is_model_ready(model, headers=acme())
    with pytest.raises(InferenceServerException) as e:  # no key: the same 401 as the OpenAI routes
        client.infer("tiny", [text_input(["Hi"])])
    assert e.value.status() == "401"


def binary_body(header: dict, raw: bytes, declared: int | None = None) -> tuple[bytes, dict]:
    head = json.dumps(header).encode()
    length = len(head) if declared is None else declared
    return head + raw, {**acme(), "Inference-Header-Content-Length": str(length)}


def test_bad_input_is_400_with_a_message(server):
    url = "/v2/models/tiny/infer"
    good = {"name": "text_input", "shape": [1], "datatype": "BYTES", "data": ["Hi"]}
    one = struct.pack("<I", 2) + b"Hi"
    cases = [
        {"inputs": [{**good, "datatype": "INT32"}]},  # wrong datatype
        {"inputs": [{**good, "shape": [2]}]},  # shape does not match the elements
        {"inputs": [{**good, "name": "prompt"}]},  # not the model's input
        {"inputs": []},  # missing input
        {"inputs": [{**good, "data": [1]}]},  # not a string
        {"inputs": [good], "outputs": [{"name": "logits"}]},  # not the model's output
        {"inputs": [good], "parameters": {"max_tokens": 0}},  # bad generation setting
        binary_body({"inputs": [{**good, "data": None, "parameters": {"binary_data_size": 6}}]}, one, 10_000),
        binary_body({"inputs": [{**good, "parameters": {"binary_data_size": 5}}]}, one[:5]),  # truncated
        binary_body({"inputs": [{**good, "parameters": {"binary_data_size": 6}}]}, struct.pack("<I", 2) + b"\xff\xfe"),
        b"{not json",
    ]
    for case in cases:
        body, headers = case if isinstance(case, tuple) else (case, acme())
        status, _, raw = post(server, url, body, headers)
        assert status == 400 and json.loads(raw)["error"], (case, raw)


def test_generate_and_generate_stream(server):
    expected = openai_texts(server, "acme/attn", ["Hello world"])[0]
    body = {"text_input": "Hello world", "parameters": GREEDY}
    status, _, raw = post(server, "/v2/models/acme/attn/generate", body)
    assert status == 200 and json.loads(raw) == {
        "model_name": "acme/attn",
        "model_version": "1",
        "text_output": expected,
    }
    status, headers, raw = post(server, "/v2/models/acme/attn/generate_stream", body)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [line.removeprefix("data: ") for line in raw.decode().split("\n\n") if line]
    assert all(e.startswith("{") for e in events)  # every event is JSON: no [DONE]
    assert "".join(json.loads(e)["text_output"] for e in events) == expected
    status, _, raw = post(server, "/v2/models/acme/nope/generate_stream", body)
    assert status == 400 and json.loads(raw) == {"error": "Request for unknown model: 'acme/nope' is not found"}


def test_lora_name_parameter_selects_the_adapter(client, server):
    """Triton's vLLM backend takes the adapter from `parameters.lora_name` on the base model: it serves that
    adapter, and a name that does not resolve (or another tenant's) is refused, never answered by the base."""
    expected = openai_texts(server, "acme/attn", ["Hello world"])[0]
    assert expected != openai_texts(server, "tiny", ["Hello world"])[0]
    for name in ("attn", "acme/attn"):
        result = client.infer(
            "tiny", [text_input(["Hello world"])], parameters={**GREEDY, "lora_name": name}, headers=acme()
        )
        assert result.as_numpy("text_output")[0].decode() == expected
    body = {"text_input": "Hello world", "parameters": {**GREEDY, "lora_name": "attn"}}
    status, _, raw = post(server, "/v2/models/tiny/generate", body)
    assert status == 200 and json.loads(raw)["text_output"] == expected
    for name in ("nope", "beta/mlp", 3):  # another tenant's adapter reads exactly as a missing one
        with pytest.raises(InferenceServerException) as e:
            client.infer("tiny", [text_input(["Hi"])], parameters={**GREEDY, "lora_name": name}, headers=acme())
        assert e.value.status() == "400"
        if isinstance(name, str):
            assert e.value.message() == f"Request for unknown model: '{name}' is not found"
    status, _, raw = post(server, "/v2/models/tiny/generate_stream", {**body, "parameters": {"lora_name": "nope"}})
    assert status == 400 and json.loads(raw) == {"error": "Request for unknown model: 'nope' is not found"}
    status, _, _ = post(server, "/v2/models/acme/attn/generate", {**body, "parameters": {"lora_name": "ready"}})
    assert status == 400  # a second adapter beside the path's one
