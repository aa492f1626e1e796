"""The one reader of untrusted JSON: request bodies of every protocol, adapter_config.json, safetensors headers.

Hostile structure (nesting, duplicate keys, absurd numbers, bytes that are not text) is refused here with a
message naming the problem, before any of it reaches code that would recurse, format or encode it.
"""

from __future__ import annotations

import json
import re
import sys
from itertools import accumulate
from typing import Any

from mux.errors import InvalidRequest

MAX_DEPTH = 64  # arrays and objects inside each other; requests and adapter files nest a few levels
MAX_BYTES = 4 << 20  # callers with a larger bound (a safetensors header) pass theirs

_NOT_MARKS = bytes(sorted(set(range(256)) - set(b'[]{}"')))  # deleted by the depth scan: all but quotes, brackets
_AS_SQUARE = bytes.maketrans(b"{}", b"[]")  # nesting is nesting: whether the kinds match is the parser's to say
_STEP = {ord("["): 1, ord("]"): -1}
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # the only way a surrogate gets into valid UTF-8 JSON
_SURROGATE = re.compile("[\ud800-\udfff]")


class BadJSON(InvalidRequest):
    """JSON refused by `loads`; the message says what was read and why (400 wherever it surfaces)."""


def loads(
    data: bytes | str, what: str = "the JSON text", max_bytes: int = MAX_BYTES, max_depth: int = MAX_DEPTH
) -> Any:
    """`data` parsed as JSON, or BadJSON naming `what` and the problem. The rules:

    - at most `max_bytes` bytes of UTF-8 (a leading BOM is skipped, as json.loads does; invalid bytes and
      UTF-16/32 are refused);
    - arrays and objects nest at most `max_depth` deep (brackets inside strings do not count);
    - an object names each key once: a duplicate is refused, not resolved, because parsers disagree on which
      one wins (Python's json keeps the last, others the first), so `{"use_dora": false, "use_dora": true}`
      or two `lora_path`s would mean one thing to a check and another to what runs;
    - strings are Unicode text: an escaped lone surrogate (`"\\ud800"`) is refused, as it cannot be encoded back;
    - integers have at most Python's int-string limit of digits (4300); NaN and ±Infinity are read, as Python's
      json does, and `1e999` is infinity: the value checks downstream refuse what must be finite.
    """
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    if len(raw) > max_bytes:
        raise BadJSON(f"{what} is over {max_bytes} bytes")
    # count first: a text with few brackets cannot nest deep (almost every request), so only others are scanned
    if raw.count(b"[") + raw.count(b"{") > max_depth and depth(raw) > max_depth:
        raise BadJSON(f"{what} nests arrays and objects deeper than {max_depth} levels")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise BadJSON(f"{what} is not valid JSON: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        value = json.loads(text, object_pairs_hook=_object)
    except _DuplicateKey as e:
        raise BadJSON(f"{what} names the key {e.key[:80]!a} twice in one object") from None
    except json.JSONDecodeError as e:
        raise BadJSON(f"{what} is not valid JSON: {e}") from None
    except ValueError:  # int() past sys.int_info's digit limit; its own message advises the operator, not the client
        raise BadJSON(f"{what} holds an integer of more than {sys.get_int_max_str_digits()} digits") from None
    except (RecursionError, MemoryError) as e:  # not expected past the checks above; still the text's fault
        raise BadJSON(f"{what} cannot be read ({type(e).__name__})") from None
    if _SURROGATE_ESCAPE.search(raw) and _has_surrogate(value):  # UTF-16 pairs (emoji, ensure_ascii) are fine
        raise BadJSON(f"{what} is not valid JSON: a string holds a lone surrogate escape, which is not Unicode text")
    return value


def depth(raw: bytes) -> int:
    """How deep arrays and objects nest in the JSON text `raw`: the most brackets open at once, outside strings
    (exact where every bracket closes; never less where some do not, which the parser refuses anyway)."""
    if b"\\" in raw:  # escapes (inside strings): only an escaped quote could pass for a string's end
        raw = raw.replace(b"\\\\", b"").replace(b'\\"', b"")  # escaped backslashes first, as a parser reads them
    brackets = b"".join(raw.translate(_AS_SQUARE, _NOT_MARKS).split(b'"')[::2])  # between quotes: strings, dropped
    passes = 0
    while brackets:  # one replace drops the innermost pairs, one level: quick while that is most of what is left
        inner = brackets.replace(b"[]", b"")
        if len(inner) > len(brackets) // 2:
            break
        brackets, passes = inner, passes + 1
    return passes + max(accumulate(map(_STEP.__getitem__, brackets)), default=0)  # the rest, a bracket at a time


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        self.key = key


def _object(pairs: list[tuple[str, Any]]) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        raise _DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return obj


def _has_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        return _SURROGATE.search(value) is not None
    if isinstance(value, dict):
        return any(_has_surrogate(k) or _has_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(map(_has_surrogate, value))
    return False
