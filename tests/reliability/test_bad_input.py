"""Hostile and broken requests against a live server: every route fuzzed from its own OpenAPI document
(schemathesis) never answers 5xx, a table of known-bad bodies each gets the right 4xx naming the problem,
and the server keeps serving."""

from __future__ import annotations

import shutil

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from conftest import run_server
from mux.server.openapi import openapi_document

schema = schemathesis.openapi.from_dict(openapi_document())


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_adapters):
    root = tmp_path_factory.mktemp("fuzz-repo")
    shutil.copytree(tiny_adapters["r4-attn"], root / "fuzz-tenant" / "fuzz-adapter")
    return root


@pytest.fixture(scope="module")
def server(root, tiny_dir):
    with run_server(tiny_dir, root, "--max-loras", "2") as base:
        yield base


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case, server):
    response = case.call(base_url=server, timeout=60)
    assert response.status_code < 500, f"{case.method} {case.formatted_path}: {response.status_code} {response.text}"


BAD_REQUESTS = [  # (route, raw body, status, words the message must contain)
    ("/v1/completions", b"{nope", 400, "not valid JSON"),
    ("/v1/completions", b'{"prompt": "\xff\xfe"}', 400, "not valid JSON"),
    ("/v1/completions", b"[1, 2]", 400, "JSON object"),
    ("/v1/completions", b'{"prompt": 5}', 400, "prompt"),
    ("/v1/completions", b'{"prompt": ""}', 400, "empty"),
    ("/v1/completions", b'{"prompt": []}', 400, "prompt"),
    ("/v1/completions", b'{"prompt": [1000000000]}', 400, "token ids"),
    ("/v1/completions", b'{"prompt": "hi", "max_tokens": "10"}', 400, "max_tokens"),
    ("/v1/completions", b'{"prompt": "hi", "max_tokens": 1000000}', 400, "context length"),
    ("/v1/completions", b'{"prompt": "hi", "max_tokens": -1}', 400, "max_tokens"),
    ("/v1/completions", b'{"prompt": "hi", "temperature": NaN}', 400, "temperature"),
    ("/v1/completions", b'{"prompt": "hi", "top_p": -1}', 400, "top_p"),
    ("/v1/completions", b'{"prompt": "hi", "n": 1000}', 400, "n"),
    ("/v1/completions", b'{"prompt": "hi", "seed": 18446744073709551616}', 400, "seed"),  # found by the fuzzer
    ("/v1/completions", b'{"prompt": "hi", "stop": [""]}', 400, "stop"),
    ("/v1/completions", b'{"prompt": "hi", "model": 5}', 400, "model"),
    ("/v1/completions", b'{"prompt": "hi", "model": "nobody/nothing"}', 404, "does not exist"),
    ("/v1/completions", b'{"prompt": [' + b"7, " * 600 + b"7]}", 400, "context length"),
    ("/v1/completions", b'{"prompt": "' + b"a" * (5 << 20) + b'"}', 413, "request body over"),
    ("/v1/chat/completions", b'{"messages": []}', 400, "messages"),
    ("/v1/chat/completions", b'{"messages": [{"role": "wizard", "content": "x"}]}', 400, "role"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": 5}]}', 400, "text"),
    ("/v1/load_lora_adapter", b'{"lora_name": "x", "lora_path": "/etc"}', 403, "outside the allowed"),
    ("/v1/load_lora_adapter", b'{"lora_name": "x", "lora_path": "\\u0000"}', 400, "NUL"),  # found by the fuzzer
    ("/v1/load_lora_adapter", b'{"lora_name": "x\\n", "lora_path": "/etc"}', 400, "adapter names"),
]


@pytest.mark.parametrize(("route", "body", "status", "words"), BAD_REQUESTS)
def test_bad_requests_name_the_problem(server, route, body, status, words):
    r = httpx.post(f"{server}{route}", content=body, headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"], r.text


@pytest.mark.parametrize("tail", ["a" * 300, "/".join(["abcdefgh"] * 1000)])  # a name, a path too long to open
def test_unopenable_paths_inside_the_adapter_dir_are_not_found(server, root, tail):
    body = {"lora_name": "long", "lora_path": f"{root}/{tail}"}
    r = httpx.post(f"{server}/v1/load_lora_adapter", json=body, timeout=60)
    assert r.status_code == 404 and "No adapter found" in r.json()["error"]["message"], r.text


@pytest.mark.parametrize(  # each of these once ended the engine loop, and every later request hung (the fuzzer)
    "extra",
    [{"temperature": 5e-324}, {"temperature": 1e-300, "n": 2}, {"seed": -(1 << 63)}, {"seed": (1 << 63) - 1, "n": 3}],
)
def test_extreme_sampling_values_are_served(server, extra):
    r = httpx.post(f"{server}/v1/completions", json={"prompt": "hi", "max_tokens": 2, **extra}, timeout=30)
    assert r.status_code == 200, r.text


def test_still_serving_after_all_of_it(server):
    r = httpx.post(f"{server}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
    assert r.status_code == 200
