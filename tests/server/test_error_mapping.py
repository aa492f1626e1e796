"""Each protocol maps overload and a request deadline to its own status, with Retry-After on overload only."""

from __future__ import annotations

import json

import pytest

from mux.errors import AdapterNotFound, DeadlineExceeded, MuxError, Overloaded
from mux.server.kserve import kserve_error
from mux.server.lorax import lorax_error
from mux.server.openai import error_response


@pytest.mark.parametrize(
    ("to_response", "overloaded", "deadline"),
    [(error_response, 429, 504), (kserve_error, 503, 504), (lorax_error, 429, 504)],
)
def test_overload_and_deadline(to_response, overloaded, deadline):
    busy = to_response(Overloaded("tenant `acme` has 4 generations in flight", retry_after=7))
    assert busy.status_code == overloaded and busy.headers["retry-after"] == "7"
    assert "acme" in json.dumps(json.loads(busy.body))
    late = to_response(DeadlineExceeded("the request did not finish within its 30 s deadline"))
    assert late.status_code == deadline and "retry-after" not in late.headers
    assert "deadline" in json.dumps(json.loads(late.body))


def test_lorax_failures_while_generating_are_424():
    for exc in (MuxError("engine step failed: boom"), AdapterNotFound("The model `acme/x` does not exist.")):
        r = lorax_error(exc)
        body = json.loads(r.body)
        assert r.status_code == 424 and body["error_type"] == "generation" and str(exc) in body["error"]


def test_model_loading_answers_503_in_each_protocols_shape(tmp_path):
    from starlette.testclient import TestClient

    from mux.server.app import ServerState, create_app

    app = create_app(ServerState(lambda: None, tmp_path))
    client = TestClient(app)  # no lifespan: the model never loads
    openai = client.post("/v1/completions", json={"model": "m", "prompt": "hi"})
    kserve = client.post("/v2/models/m/generate", json={"text_input": "hi"})
    lorax = client.post("/generate", json={"inputs": "hi"})
    for r in (openai, kserve, lorax):
        assert r.status_code == 503 and r.headers["retry-after"] == "5"
    assert openai.json()["error"]["type"] == "ServiceUnavailable"
    assert kserve.json() == {"error": "the model is still loading"}
    assert lorax.json()["error_type"] == "overloaded" and "still loading" in lorax.json()["error"]
