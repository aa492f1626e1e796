"""read_json: the byte limit holds without a Content-Length (chunked bodies), and bad bodies are 400s."""

from __future__ import annotations

import asyncio

import pytest
from starlette.requests import Request

from mux.errors import InvalidRequest
from mux.server.openai import MAX_JSON_BYTES, BodyTooLarge, read_json


def request(chunks: list[bytes]) -> Request:
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]

    async def receive():
        return messages.pop(0)

    return Request({"type": "http", "method": "POST", "headers": []}, receive)


def test_chunked_body_over_the_limit_is_refused():
    chunk = b" " * (1 << 20)
    with pytest.raises(BodyTooLarge):
        asyncio.run(read_json(request([b"{", *[chunk] * (MAX_JSON_BYTES // len(chunk) + 1), b"}"])))


@pytest.mark.parametrize("body", [b"{nope", b"[1, 2]", b"\xff\xfe"])
def test_bad_bodies(body):
    with pytest.raises(InvalidRequest):
        asyncio.run(read_json(request([body])))


def test_good_body():
    assert asyncio.run(read_json(request([b'{"a":', b" 1}"]))) == {"a": 1}
