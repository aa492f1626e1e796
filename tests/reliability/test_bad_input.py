"""Hostile and broken requests against a live server: every route fuzzed from its own OpenAPI document
(schemathesis: hostile values; bench/parsers.py: hostile structure at every position of every body and in
uploaded adapters) never answers 5xx, tables of known-bad bodies and structures each get the right 4xx naming
the problem, and the server keeps serving, with no traceback in its log."""

from __future__ import annotations

import gzip
import json
import shutil
import struct
import time

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from bench import parsers
from conftest import server_output, start_server
from mux.server.openapi import openapi_document

schema = schemathesis.openapi.from_dict(openapi_document())


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_adapters):
    root = tmp_path_factory.mktemp("fuzz-repo")
    shutil.copytree(tiny_adapters["r4-attn"], root / "fuzz-tenant" / "fuzz-adapter")
    return root


@pytest.fixture(scope="module")
def served(root, tiny_dir):
    """(process, base URL) of a default server."""
    proc, base = start_server(tiny_dir, root, "--max-loras", "2")
    try:
        yield proc, base
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        proc.log.close()


@pytest.fixture(scope="module")
def server(served):
    return served[1]


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


DEEP = b"[" * 100_000 + b"]" * 100_000  # 200 KB, under the body limit: once a 500 on six routes
STRUCTURES = {  # (body, words of the message): what the one JSON reader refuses, on every route that reads JSON
    "array nested 100,000 deep": (DEEP, "nests arrays and objects deeper than 64 levels"),
    "object nested 100,000 deep": (b'{"a":' * 100_000 + b"1" + b"}" * 100_000, "deeper than 64 levels"),
    "a field nested 100,000 deep": (b'{"prompt": "hi", "x": ' + DEEP + b"}", "deeper than 64 levels"),
    "65 levels": (b'{"x": ' + b"[" * 64 + b"]" * 64 + b"}", "deeper than 64 levels"),
    "a duplicate key": (b'{"model": "tiny", "model": "fuzz-tenant/fuzz-adapter"}', "names the key 'model' twice"),
    "an integer of 5,000 digits": (b'{"max_tokens": ' + b"9" * 5000 + b"}", "integer of more than 4300 digits"),
    "invalid UTF-8": (b'{"x": "\xff\xfe"}', "not UTF-8 text"),
    "a lone surrogate": (b'{"x": "\\ud800"}', "lone surrogate"),
    "UTF-16": ('{"x": 1}'.encode("utf-16"), "not UTF-8 text"),
    "gzip of 100,000 levels": (gzip.compress(DEEP), "deeper than 64 levels"),
}
JSON_ROUTES = {  # route -> the status of a body the reader refuses (LoRAX: 422, its validation status)
    "/v1/completions": 400,
    "/v1/chat/completions": 400,
    "/v1/load_lora_adapter": 400,
    "/v1/unload_lora_adapter": 400,
    "/v2/models/tiny/infer": 400,
    "/v2/models/tiny/generate": 400,
    "/v2/models/tiny/generate_stream": 400,
    "/v2/repository/index": 400,
    "PUT /v1/adapters/fuzz-tenant/fuzz-adapter/traffic": 400,
    "/v1/adapters/fuzz-tenant/fuzz-adapter/promote": 400,
    "/v1/adapters/fuzz-tenant/fuzz-adapter/rollback": 400,
    "/v1/batches": 400,
    "/": 422,
    "/generate": 422,
    "/generate_stream": 422,
}


def _message(r: httpx.Response) -> str:
    error = r.json()["error"]
    return error["message"] if isinstance(error, dict) else error  # OpenAI's object; KServe's, LoRAX's string


@pytest.mark.parametrize("case", list(STRUCTURES))
@pytest.mark.parametrize("route", list(JSON_ROUTES))
def test_hostile_structure_is_a_4xx_naming_it(server, route, case):
    body, words = STRUCTURES[case]
    headers = {"content-type": "application/json"}
    if case.startswith("gzip"):
        headers["content-encoding"] = "gzip"
    method, _, path = route.rpartition(" ")
    r = httpx.request(method or "POST", f"{server}{path}", content=body, headers=headers, timeout=60)
    assert r.status_code == JSON_ROUTES[route], r.text[:300]
    assert words in _message(r) and len(_message(r)) < 200, r.text[:300]


def test_hostile_structure_in_a_binary_infer_header(server):
    header = b'{"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1], "x": ' + DEEP + b"}]}"
    r = httpx.post(
        f"{server}/v2/models/tiny/infer",
        content=header + struct.pack("<I", 2) + b"hi",
        headers={"inference-header-content-length": str(len(header))},
        timeout=60,
    )
    assert r.status_code == 400 and "the inference request header nests" in r.json()["error"], r.text[:300]


def _with_header(weights: bytes, change) -> bytes:
    (n,) = struct.unpack("<Q", weights[:8])
    blob = change(json.dumps(json.loads(weights[8 : 8 + n])).encode())
    return struct.pack("<Q", len(blob)) + blob + weights[8 + n :]


UPLOADS = {  # an upload's hostile adapter: (its config's text and weights' bytes from the good ones, words)
    "config nested 100,000 deep (once a 500)": (lambda c, w: (c[:-1] + b', "x": ' + DEEP + b"}", w), "deeper than"),
    "config a whole nest": (lambda c, w: (DEEP, w), "adapter_config.json nests arrays and objects deeper"),
    "config with r twice": (lambda c, w: (c[:-1] + b', "r": 16}', w), "adapter_config.json names the key 'r' twice"),
    "config of invalid UTF-8": (lambda c, w: (c[:-1] + b', "x": "\xff"}', w), "adapter_config.json is not valid JSON"),
    "header nested 100,000 deep": (
        lambda c, w: (c, _with_header(w, lambda t: t[:-1] + b', "x": ' + DEEP + b"}")),
        "the header nests",
    ),
    "header naming a tensor twice": (
        lambda c, w: (c, _with_header(w, lambda t: b'{"a.lora_A.weight": 1, "a.lora_A.weight": 2, ' + t[1:])),
        "the header names the key 'a.lora_A.weight' twice",
    ),
}


@pytest.mark.parametrize("archive", [False, True], ids=["files", "tar.gz"])
@pytest.mark.parametrize("case", list(UPLOADS))
def test_hostile_structure_in_an_upload_is_a_400(server, root, case, archive):
    change, words = UPLOADS[case]
    good = root / "fuzz-tenant" / "fuzz-adapter"
    config = json.dumps(json.loads((good / parsers.CONFIG).read_text())).encode()
    config, weights = change(config, (good / parsers.WEIGHTS).read_bytes())
    if archive:
        files = {"archive": parsers.tar_gz({parsers.CONFIG: config, parsers.WEIGHTS: weights})}
    else:
        files = {parsers.CONFIG: (parsers.CONFIG, config), parsers.WEIGHTS: (parsers.WEIGHTS, weights)}
    r = httpx.post(f"{server}/v1/adapters", files=files, data={"name": "hostile"}, timeout=60)
    assert r.status_code == 400 and words in r.json()["error"]["message"], r.text[:300]


def test_structure_fuzz_of_every_route(server, root):
    """bench/parsers.py at its CI size: every shape at every route's whole body, and at each other position of
    the JSON bodies and of an uploaded adapter a few shapes in turn (`python -m bench.parsers --long`: all)."""
    cases = parsers.all_cases(
        openapi_document(), "tiny", root / "fuzz-tenant" / "fuzz-adapter", parsers.CI, parsers.CI_PER_POSITION
    )
    report = parsers.run(server, cases)
    assert report.cases > 2000 and len(report.by_route) == sum(len(ops) for ops in openapi_document()["paths"].values())
    assert not report.server_errors, report.server_errors[:10]  # no 5xx, no request that failed outright
    assert not report.timeouts, report.timeouts[:10]
    assert not report.accepted_refusals, report.accepted_refusals[:10]  # what the reader refuses is a 4xx
    assert parsers.internal_errors(server) == 0


def test_still_serving_after_all_of_it(served):
    proc, server = served
    r = httpx.post(f"{server}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
    assert r.status_code == 200
    time.sleep(0.5)  # the log is written by the server process
    log = server_output(proc)
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-3000:]
