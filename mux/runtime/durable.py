"""Files that survive `kill -9`: fsync a path; replace a JSON file atomically (a temp file beside it, fsync,
rename, fsync of the directory), so a crash leaves the old file or the new one. A crash before the rename leaves
the temp file, named `.<name>-<hex>`, for the owner's recovery to remove."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, data, **dump) -> None:
    """Replace `path` with `data` as JSON (`dump`: json.dump's options)."""
    write_bytes(path, json.dumps(data, **dump).encode())


def write_bytes(path: Path, data: bytes) -> None:
    """Replace `path` with `data`: a crash leaves the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}-{uuid.uuid4().hex}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # gone already after the rename
    fsync(path.parent)
