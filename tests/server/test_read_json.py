"""read_json: the byte limit holds without a Content-Length (chunked bodies) and once decompressed (gzip,
deflate), and bad bodies are 400s."""

from __future__ import annotations

import asyncio

import pytest
from starlette.requests import Request

from mux.errors import InvalidRequest
from mux.server.openai import MAX_JSON_BYTES, BodyTooLarge, read_json


def request(chunks: list[bytes], encoding: str | None = None) -> Request:
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]

    async def receive():
        return messages.pop(0)

    headers = [(b"content-encoding", encoding.encode())] if encoding else []
    return Request({"type": "http", "method": "POST", "headers": headers}, receive)


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


@pytest.mark.parametrize(("encoding", "wbits"), [("gzip", 31), ("deflate", 15), ("GZIP ", 31)])
def test_compressed_bodies(encoding, wbits):
    import zlib

    c = zlib.compressobj(wbits=wbits)
    body = c.compress(b'{"a": 1}') + c.flush()
    assert asyncio.run(read_json(request([body[:5], body[5:]], encoding))) == {"a": 1}


def test_compressed_bodies_are_bounded_and_checked():
    import gzip

    bomb = gzip.compress(b" " * (MAX_JSON_BYTES + 1))  # a few KB on the wire
    with pytest.raises(BodyTooLarge, match="once decompressed"):
        asyncio.run(read_json(request([bomb], "gzip")))
    body = gzip.compress(b'{"a": 1}')
    for bad, why in ((body[:-9], "truncated"), (b"not gzip", "cannot be decompressed")):
        with pytest.raises(InvalidRequest, match=why):
            asyncio.run(read_json(request([bad], "gzip")))
    with pytest.raises(InvalidRequest, match="not supported"):
        asyncio.run(read_json(request([body], "br")))
