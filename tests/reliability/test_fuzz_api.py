"""Fuzz every route of the HTTP API from its own OpenAPI document (schemathesis) against a live server:
whatever arrives, the answer is never a 5xx, and the server keeps serving."""

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
def server(tmp_path_factory, tiny_dir, tiny_adapters):
    root = tmp_path_factory.mktemp("fuzz-repo")
    shutil.copytree(tiny_adapters["r4-attn"], root / "fuzz-tenant" / "fuzz-adapter")
    with run_server(tiny_dir, root, "--max-loras", "2") as base:
        yield base


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case, server):
    response = case.call(base_url=server, timeout=60)
    assert response.status_code < 500, f"{case.method} {case.formatted_path}: {response.status_code} {response.text}"


def test_still_serving_after_the_fuzz(server):
    r = httpx.post(f"{server}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
    assert r.status_code == 200
