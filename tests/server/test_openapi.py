"""/openapi.json documents exactly the routes the app serves."""

from __future__ import annotations

import re
from pathlib import Path

from starlette.testclient import TestClient

from mux.server.app import ServerState, create_app
from mux.server.openapi import openapi_document


def test_document_matches_the_routes(tmp_path: Path):
    state = ServerState(lambda: (_ for _ in ()).throw(RuntimeError("no model in this test")), tmp_path)
    app = create_app(state)
    # `{model:path}` is documented as `{model}` (a converter is not OpenAPI syntax)
    served = {(re.sub(r":\w+}", "}", r.path), m.lower()) for r in app.routes for m in (r.methods or ()) if m != "HEAD"}
    doc = openapi_document()
    documented = {(path, method) for path, ops in doc["paths"].items() for method in ops}
    assert documented == served
    with TestClient(app) as client:  # the lifespan's model load fails in the background; routes still answer
        assert client.get("/openapi.json").json()["openapi"].startswith("3.")
        assert client.get("/health").status_code == 200
