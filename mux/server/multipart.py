"""Bounded multipart bodies: a `receive` that stops a body past its limit (whatever Content-Length said), and
saving an uploaded part. Shared by adapter uploads and batch-input files."""

from __future__ import annotations

import shutil
from pathlib import Path

from starlette.datastructures import UploadFile

from mux.errors import MuxError


class TooLarge(MuxError):
    """An uploaded file over its size limit (413)."""


def limited(receive, limit: int):
    """`receive` that raises TooLarge once the body passes `limit` bytes, whatever Content-Length said."""
    seen = 0

    async def counted() -> dict:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise TooLarge()
        return message

    return counted


def save_upload(upload: UploadFile, dst: Path) -> None:
    """An uploaded part, copied to `dst` in 1 MiB chunks."""
    upload.file.seek(0)
    with open(dst, "wb") as out:
        shutil.copyfileobj(upload.file, out, 1 << 20)
