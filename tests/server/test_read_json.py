"""read_json: the byte limit holds without a Content-Length (chunked bodies) and once decompressed (gzip,
deflate), and bad bodies are 400s. mux.jsonread, the reader behind it and every other untrusted JSON: each rule
refuses what it names (a 400 saying so) and lets the rest through, and its depth scan counts what a parser does."""

from __future__ import annotations

import asyncio
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.requests import Request

from mux import jsonread
from mux.errors import InvalidRequest
from mux.jsonread import MAX_DEPTH, BadJSON, depth, loads
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


REFUSED = [  # (text, words of the message)
    (b"[" * 100_000 + b"]" * 100_000, f"deeper than {MAX_DEPTH} levels"),  # the 200 KB that once was a 500
    (b'{"a":' * 100_000 + b"1" + b"}" * 100_000, "deeper than"),
    (b'{"messages": [' + b"[" * 63 + b"]" * 63 + b"]}", "deeper than"),  # 65 levels in all
    (b"[" * 100_000, "deeper than"),  # never closed
    (b'{"model": "a", "model": "b"}', "names the key 'model' twice"),
    (b'{"x": [{"k": 1, "k": 1}]}', "names the key 'k' twice"),  # equal values too: nested
    (b'{"\\ud800": 1, "\\ud800": 2}', "names the key '\\ud800' twice"),  # a key that cannot be printed as is
    (b'{"seed": ' + b"9" * 5000 + b"}", "integer of more than 4300 digits"),
    (b'{"prompt": "\xff\xfe"}', "not UTF-8 text (invalid start byte at byte 12)"),
    (b'{"prompt": "\xed\xa0\x80"}', "not UTF-8 text"),  # a surrogate in UTF-8 bytes
    ('{"prompt": "hi"}'.encode("utf-16"), "not UTF-8 text"),
    (b'{"prompt": "\\ud800"}', "lone surrogate"),
    (b'{"prompt": "\\udc00\\ud800"}', "lone surrogate"),  # a pair the wrong way round
    (b'{"\\udfff": 1}', "lone surrogate"),  # in a key
    (b'{"prompt": "a\x01"}', "Invalid control character"),
    (b"{nope", "Expecting property name"),
    (b"", "Expecting value"),
    (b'{"a": 1} {"a": 1}', "Extra data"),
]


@pytest.mark.parametrize(("text", "words"), REFUSED, ids=lambda v: v[:24] if isinstance(v, bytes) else None)
def test_refused_texts_name_the_problem(text, words):
    with pytest.raises(BadJSON, match="the request body") as e:
        loads(text, "the request body")
    assert words in str(e.value) and isinstance(e.value, InvalidRequest)  # a 400 wherever it is not caught
    assert len(str(e.value)) < 200  # the message names the problem; it does not quote the text


ACCEPTED = [  # (text, value)
    (b"[" * MAX_DEPTH + b"]" * MAX_DEPTH, json.loads(b"[" * MAX_DEPTH + b"]" * MAX_DEPTH)),
    (b'{"prompt": "' + b"[{" * 50_000 + b'"}', {"prompt": "[{" * 50_000}),  # brackets in a string do not nest
    (b'["\\"[[[[", "\\\\", [[["]]]"]]]]', ['"[[[[', "\\", [[["]]]"]]]]),  # escaped quotes and backslashes
    (b'{"a": "\\ud83d\\ude00"}', {"a": "\U0001f600"}),  # a surrogate pair: what ensure_ascii sends for an emoji
    (b'{"a": "\\\\ud800"}', {"a": "\\ud800"}),  # an escaped backslash, then text
    (b'\xef\xbb\xbf{"a": 1}', {"a": 1}),  # a UTF-8 BOM is skipped, as json.loads skips it
    (b'{"a": 1e999, "b": -1e999, "c": 1e-999}', {"a": float("inf"), "b": float("-inf"), "c": 0.0}),
    (b'{"seed": ' + b"9" * 4300 + b"}", {"seed": int("9" * 4300)}),
    (b'{"a": {"a": 1}, "b": {"a": 1}}', {"a": {"a": 1}, "b": {"a": 1}}),  # one key in two objects
]


@pytest.mark.parametrize(("text", "value"), ACCEPTED, ids=lambda v: v[:24] if isinstance(v, bytes) else None)
def test_accepted_texts(text, value):
    assert loads(text) == value


def test_nan_is_read_and_size_is_bounded():
    assert loads(b"[NaN]")[0] != loads(b"[NaN]")[0]  # NaN: the value checks refuse it where a number is due
    assert loads("[1]") == [1]  # text too
    with pytest.raises(BadJSON, match="over 10 bytes"):
        loads(b"[" + b"1," * 10 + b"1]", max_bytes=10)
    with pytest.raises(BadJSON, match="deeper than 3 levels"):
        loads(b"[[[[]]]]", max_depth=3)


def test_read_json_applies_the_rules():
    with pytest.raises(BadJSON, match="the request body nests arrays and objects deeper"):
        asyncio.run(read_json(request([b"[" * 50_000, b"]" * 50_000])))
    with pytest.raises(BadJSON, match="the request body names the key 'prompt' twice"):
        asyncio.run(read_json(request([b'{"prompt": "a", "prompt": "b"}'])))


def test_a_body_with_few_brackets_is_not_scanned(monkeypatch):
    """The depth scan runs only where the brackets could nest deeper than the limit: a chat body is parsed as is."""
    monkeypatch.setattr(jsonread, "depth", lambda raw: pytest.fail("scanned"))
    body = {"model": "demo/json", "messages": [{"role": "user", "content": "word " * 40} for _ in range(40)]}
    assert loads(json.dumps(body).encode()) == body


strings = st.text(alphabet='[]{}"\\ab\n\u00e9\U0001f600', max_size=6)
values = st.recursive(
    st.none() | st.integers() | strings,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(strings, inner, max_size=4),
    max_leaves=30,
)


def _nesting(value) -> int:
    if isinstance(value, list):
        return 1 + max(map(_nesting, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(_nesting, value.values()), default=0)
    return 0


@settings(max_examples=300, deadline=None)
@given(value=values, ascii_only=st.booleans())
def test_depth_counts_what_the_parser_nests(value, ascii_only):
    """Strings full of brackets, quotes and backslashes: the scan skips them exactly."""
    text = json.dumps(value, ensure_ascii=ascii_only).encode()
    assert depth(text) == _nesting(value)
    assert loads(text, max_depth=max(_nesting(value), 1)) == value
