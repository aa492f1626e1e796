"""Overload and disconnects on a real server: per-tenant limits answer 429 with Retry-After, other tenants keep
being served, and a client that goes away mid-stream frees its KV blocks and adapter pin at once."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest

from bench.soak import wait_idle
from conftest import run_server, write_policy

KEYS = {"admin": "admin-secret", "acme": "acme-secret", "beta": "beta-secret"}
LONG = {"max_tokens": 400, "temperature": 0, "ignore_eos": True, "stream": True}


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_dir, tiny_adapters):
    root = tmp_path_factory.mktemp("repo")
    shutil.copytree(tiny_adapters["r4-attn"], root / "acme" / "a")
    shutil.copytree(tiny_adapters["r8-mlp"], root / "beta" / "b")
    policy = tmp_path_factory.mktemp("policy") / "policy.toml"
    write_policy(policy, KEYS, extra={"acme": "max_concurrent = 2"})
    with run_server(tiny_dir, root, "--policy", str(policy)) as base:
        yield base


def _headers(who: str) -> dict:
    return {"Authorization": f"Bearer {KEYS[who]}"}


def _wait_idle(base: str) -> dict:
    state = wait_idle(base, _headers("admin"), timeout=10)
    assert state["idle"], f"not idle: {state}"
    return state


def _first_chunks(client: httpx.Client, base: str, who: str, model: str, n: int = 3) -> None:
    """Open a stream, read `n` events, then drop the connection (closing the response)."""
    body = {"model": model, "prompt": "hello", **LONG}
    with client.stream("POST", f"{base}/v1/completions", json=body, headers=_headers(who)) as r:
        assert r.status_code == 200
        for i, _ in enumerate(r.iter_lines()):
            if i >= n:
                break


def test_disconnect_mid_stream_frees_kv_and_pin(server):
    before = _wait_idle(server)["finished"].get("cancelled", 0)
    for _ in range(3):
        with httpx.Client(timeout=30) as client:  # a fresh connection each time, closed mid-stream
            _first_chunks(client, server, "acme", "a")
    s = _wait_idle(server)
    assert s["finished"].get("cancelled", 0) - before == 3  # counted: each one cancelled, not finished


def test_tenant_over_its_limit_gets_429_and_others_are_served(server):
    _wait_idle(server)
    body = {"model": "a", "prompt": "hello", **LONG}
    with (
        httpx.Client(timeout=30) as c1,
        httpx.Client(timeout=30) as c2,
        httpx.Client(timeout=30) as c3,
        c1.stream("POST", f"{server}/v1/completions", json=body, headers=_headers("acme")) as r1,
        c2.stream("POST", f"{server}/v1/completions", json=body, headers=_headers("acme")) as r2,
    ):
        assert r1.status_code == r2.status_code == 200
        third = c3.post(f"{server}/v1/completions", json={**body, "stream": False}, headers=_headers("acme"))
        assert third.status_code == 429
        assert int(third.headers["retry-after"]) >= 1
        assert "acme" in third.json()["error"]["message"] and third.json()["error"]["code"] == 429
        other = c3.post(
            f"{server}/v1/completions",
            json={"model": "b", "prompt": "hi", "max_tokens": 4, "temperature": 0},
            headers=_headers("beta"),
        )
        assert other.status_code == 200, other.text  # beta has its own limit
        n = json.loads(next(line for line in r1.iter_lines() if line.startswith("data:"))[5:])
        assert n["choices"]
    _wait_idle(server)  # the two streams were dropped: their places come back
    ok = httpx.post(
        f"{server}/v1/completions",
        json={"model": "a", "prompt": "hi", "max_tokens": 2, "temperature": 0},
        headers=_headers("acme"),
        timeout=30,
    )
    assert ok.status_code == 200


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", {"model": "a", "prompt": "hello", "max_tokens": 500, "ignore_eos": True}),
        ("/v2/models/a/generate", {"text_input": "hello", "parameters": {"max_tokens": 500, "ignore_eos": True}}),
        (
            "/generate",
            {"inputs": "hello", "parameters": {"adapter_id": "a", "max_new_tokens": 500, "ignore_eos_token": True}},
        ),
    ],
)
def test_disconnect_before_a_plain_response_cancels_the_generation(server, path, body):
    """No stream to write into: the server watches the connection itself and cancels when the client leaves."""
    import socket
    import time
    from urllib.parse import urlsplit

    before = _wait_idle(server)["finished"]
    url = urlsplit(server)
    raw = json.dumps(body).encode()
    head = f"POST {path} HTTP/1.1\r\nHost: {url.netloc}\r\nAuthorization: Bearer {KEYS['acme']}\r\n"
    head += f"Content-Type: application/json\r\nContent-Length: {len(raw)}\r\n\r\n"
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        sock.sendall(head.encode() + raw)
        deadline = time.monotonic() + 10
        while httpx.get(f"{server}/admin/stats", headers=_headers("admin")).json()["engine"]["running"] == 0:
            assert time.monotonic() < deadline, "the request never started"
            time.sleep(0.01)
    after = _wait_idle(server)["finished"]
    assert after.get("cancelled", 0) - before.get("cancelled", 0) == 1
    assert after.get("length", 0) == before.get("length", 0)  # it did not run on to max_tokens


def test_a_request_that_can_never_be_admitted_is_400_not_429(server):
    body = {"model": "a", "prompt": "hello", "max_tokens": 2, "n": 3}  # acme may have 2 in flight
    r = httpx.post(f"{server}/v1/completions", json=body, headers=_headers("acme"), timeout=30)
    assert r.status_code == 400 and "retry-after" not in r.headers
    assert "asks for 3 generations" in r.json()["error"]["message"]
