"""Talking to a running server: the httpx client from --url/--key, one call with its refusal as a `ClientError`,
and the adapter id a plain NAME stands for."""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported when a command runs: `mux serve` does not need httpx
    import httpx

DEFAULT_URL = "http://127.0.0.1:8000"


class ClientError(Exception):
    """The server refused (its message), could not be reached, or the command's input is wrong."""


def connect(args: argparse.Namespace) -> httpx.Client:
    import httpx

    url = args.url or os.environ.get("MUX_URL") or DEFAULT_URL
    key = args.key if args.key is not None else os.environ.get("MUX_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=url, headers=headers, timeout=args.timeout)


def call(http: httpx.Client, method: str, path: str, **kwargs) -> httpx.Response:
    import httpx

    try:
        r = http.request(method, path, **kwargs)
    except httpx.HTTPError as e:
        raise ClientError(f"{method} {http.base_url.join(path)}: {e or type(e).__name__}") from None
    if r.is_error:
        raise ClientError(f"{r.status_code} {r.reason_phrase}: {_message(r)}")
    return r


def _message(r: httpx.Response) -> str:
    """The error text of any of the server's protocols: OpenAI's error.message, Triton's and LoRAX's error."""
    try:
        body = r.json()
    except ValueError:
        return r.text.strip() or r.reason_phrase
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and "message" in error:
        return str(error["message"])
    return str(error) if error is not None else r.text.strip()


def resolve(http: httpx.Client, name: str) -> str:
    """TENANT/NAME as given; a plain NAME is the one adapter of that name this key can see."""
    if "/" in name:
        return name
    found = [m["id"] for m in call(http, "GET", "/v1/adapters").json()["data"] if m["id"].split("/", 1)[1] == name]
    if not found:
        raise ClientError(f"no adapter named {name!r} is visible to this key")
    if len(found) > 1:
        raise ClientError(f"{name!r} is ambiguous ({', '.join(found)}): give TENANT/NAME")
    return found[0]
