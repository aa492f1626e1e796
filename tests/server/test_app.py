"""The app's last-resort guard: an exception no route handled (a bug) is a 500 in the route's own protocol,
counted in /metrics by route, and one log line naming the route and the exception class, never the request."""

from __future__ import annotations

import asyncio
import logging

import pytest
from prometheus_client import generate_latest
from starlette.requests import ClientDisconnect
from starlette.testclient import TestClient

from mux.server.app import LastResort, ServerState, create_app
from mux.server.metrics import Metrics

SECRET = "tenant-secret-prompt"


class BrokenEngine:
    """Whatever a route asks of it raises, with the request's text in the message (as a KeyError may)."""

    def __getattr__(self, name):
        raise KeyError(f"{name} for {SECRET}")


@pytest.fixture()
def state(tmp_path):
    state = ServerState(lambda: None, tmp_path)
    state.engine = BrokenEngine()
    return state


def test_bugs_are_500s_in_each_protocol_counted_and_logged_in_one_line(state, caplog):
    client = TestClient(create_app(state))  # no lifespan: the engine stays the broken one
    caplog.set_level(logging.INFO)
    openai = client.post("/v1/completions", json={"prompt": SECRET})
    kserve = client.post("/v2/models/tiny/generate", json={"text_input": SECRET})
    lorax = client.post("/generate", json={"inputs": SECRET})
    for r in (openai, kserve, lorax):
        assert r.status_code == 500 and SECRET not in r.text
    assert openai.json()["error"] == {
        "message": "internal server error (KeyError); it is logged",
        "type": "InternalServerError",
        "param": None,
        "code": 500,
    }
    assert kserve.json() == {"error": "internal server error (KeyError); it is logged"}
    assert lorax.json() == {"error": "internal server error (KeyError); it is logged", "error_type": "internal"}

    lines = [r for r in caplog.records if r.levelno >= logging.WARNING]  # all of them: no traceback elsewhere
    assert [r.getMessage().split(" at ")[0] for r in lines] == [
        "500 on POST /v1/completions: KeyError",
        "500 on POST /v2/models/{model:path}/generate: KeyError",
        "500 on POST /generate: KeyError",
    ]
    for r in lines:  # where it was raised, in the same line; no traceback
        assert "test_app.py:" in r.getMessage() and r.exc_info is None and "\n" not in r.getMessage()
    assert SECRET not in caplog.text  # nor the request, nor the exception's message, which quoted it

    state.engine = None  # the engine's own figures are left out of the scrape
    scrape = generate_latest(state.metrics.registry).decode()
    assert 'mux_internal_errors_total{route="/v1/completions"} 1.0' in scrape
    assert 'mux_internal_errors_total{route="/v2/models/{model:path}/generate"} 1.0' in scrape
    assert 'mux_internal_errors_total{route="/generate"} 1.0' in scrape


async def _call(app, routes=()) -> tuple[list[dict], Metrics]:
    metrics, sent = Metrics(state=None), []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    guard = LastResort(app, routes=list(routes), errors={}, metrics=metrics)
    await guard({"type": "http", "method": "POST", "path": "/x", "headers": []}, receive, send)
    return sent, metrics


def _count(metrics: Metrics, route: str) -> float:
    return metrics.internal_errors.labels(route)._value.get()


def test_a_bug_after_the_response_began_ends_it_and_is_counted(caplog):
    async def streams_then_fails(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
        raise ValueError(SECRET)

    sent, metrics = asyncio.run(_call(streams_then_fails))
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]  # no second start
    assert _count(metrics, "unrouted") == 1
    assert "500 on POST unrouted: ValueError at test_app.py:" in caplog.text and SECRET not in caplog.text


def test_a_client_that_left_mid_body_is_no_bug():
    async def reads_a_body_the_client_abandoned(scope, receive, send):
        raise ClientDisconnect()

    sent, metrics = asyncio.run(_call(reads_a_body_the_client_abandoned))
    assert sent[0]["status"] == 499 and _count(metrics, "unrouted") == 0
