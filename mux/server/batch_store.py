"""Batch jobs' state on disk: uploaded files, batch records and their output, written so that `kill -9` at any
moment loses nothing acknowledged and writes nothing twice.

    <dir>/files/<file-id>/{meta.json, content}      a file: the directory is renamed in once complete
    <dir>/batches/<batch-id>/batch.json             the batch object (replaced atomically)
    <dir>/batches/<batch-id>/{output,errors}.jsonl  one line per finished request line, appended and fsynced

A line is appended only once its response is complete; at resume a torn last line (the crash came mid-write) is
cut off, and the lines already there are not run again.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from mux.errors import NotFound
from mux.runtime import durable

OUTPUT, ERRORS = "output.jsonl", "errors.jsonl"


@dataclass(frozen=True, slots=True)
class BatchConfig:
    """The policy file's [batch] section."""

    max_file_bytes: int = 200 << 20  # an uploaded file (OpenAI's limit: 200 MB); past it 413
    max_lines: int = 50_000  # request lines in one batch (OpenAI's limit); past it the batch fails validation
    token_weight: float = 1.0  # a batch token counts this much of a tenant's tokens_per_minute
    max_in_flight: int = 64  # lines of one batch submitted to the engine at once

    def __post_init__(self) -> None:
        if self.max_file_bytes < 1 or self.max_lines < 1 or self.max_in_flight < 1:
            raise ValueError("[batch] max_file_bytes, max_lines and max_in_flight must be >= 1")
        if not 0.0 <= self.token_weight <= 100.0:
            raise ValueError(f"[batch] token_weight must be between 0 and 100, got {self.token_weight}")


class BatchStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._lock = threading.Lock()
        self._statuses: dict[str, str] | None = None  # batch id -> status, read from disk once (for the stats)

    # ---- files --------------------------------------------------------------------------------
    def add_file(self, tenant: str | None, filename: str, purpose: str, source: Path) -> dict:
        """Move the complete upload at `source` in as a new file; returns its File object."""
        file_id = f"file-{uuid.uuid4().hex[:24]}"
        staged = self._staging() / file_id
        staged.mkdir()
        os.replace(source, staged / "content")
        meta = {
            "id": file_id,
            "object": "file",
            "bytes": (staged / "content").stat().st_size,
            "created_at": int(time.time()),
            "_created_ns": time.time_ns(),  # the order of records made within one second (not shown)
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
            "tenant": tenant,
        }
        durable.write_json(staged / "meta.json", meta)
        durable.fsync(staged / "content")
        (self.root / "files").mkdir(parents=True, exist_ok=True)
        os.rename(staged, self.root / "files" / file_id)
        durable.fsync(self.root / "files")
        return meta

    def files(self) -> list[dict]:
        return self._records("files", "file-*", "meta.json")

    def file(self, file_id: str) -> dict:
        meta = _read_json(self._file_dir(file_id) / "meta.json") if _is_id(file_id, "file-") else None
        if meta is None:
            raise NotFound(f"No such File object: {file_id}")
        return meta

    def content_path(self, file_id: str) -> Path:
        self.file(file_id)
        return self._file_dir(file_id) / "content"

    def delete_file(self, file_id: str) -> None:
        self.file(file_id)
        trash = self._staging() / f"deleted-{uuid.uuid4().hex}"
        os.rename(self._file_dir(file_id), trash)
        shutil.rmtree(trash, ignore_errors=True)

    def _file_dir(self, file_id: str) -> Path:
        return self.root / "files" / file_id

    # ---- batches --------------------------------------------------------------------------------
    def batches(self) -> list[dict]:
        return self._records("batches", "batch_*", "batch.json")

    def _records(self, folder: str, pattern: str, name: str) -> list[dict]:
        """Every complete record under <dir>/<folder>, oldest first."""
        found = [_read_json(d / name) for d in (self.root / folder).glob(pattern)]
        return sorted((r for r in found if r is not None), key=created)

    def batch(self, batch_id: str) -> dict:
        batch = _read_json(self.batch_dir(batch_id) / "batch.json") if _is_id(batch_id, "batch_") else None
        if batch is None:
            raise NotFound(f"No such Batch object: {batch_id}")
        return batch

    def save_batch(self, batch: dict) -> None:
        directory = self.batch_dir(batch["id"])
        directory.mkdir(parents=True, exist_ok=True)
        durable.write_json(directory / "batch.json", batch)
        if self._statuses is not None:
            self._statuses[batch["id"]] = batch["status"]

    def status_counts(self) -> dict[str, int]:
        """Batches by status, without reading every record at each scrape."""
        if self._statuses is None:
            self._statuses = {b["id"]: b["status"] for b in self.batches()}
        return dict(Counter(self._statuses.values()))

    def batch_dir(self, batch_id: str) -> Path:
        return self.root / "batches" / batch_id

    def finished_lines(self, batch_id: str) -> dict[str, int]:
        """custom_id -> status code of every line already written, after cutting a torn last line off."""
        done: dict[str, int] = {}
        for name in (OUTPUT, ERRORS):
            path = self.batch_dir(batch_id) / name
            if not path.exists():
                continue
            data = path.read_bytes()
            end = data.rfind(b"\n") + 1
            if end < len(data):  # the crash came mid-line: that line was never acknowledged anywhere
                with open(path, "r+b") as f:
                    f.truncate(end)
                    os.fsync(f.fileno())
            for line in data[:end].splitlines():
                record = json.loads(line)
                response = record.get("response") or {}
                done[record["custom_id"]] = response.get("status_code", 500)
        return done

    def append(self, batch_id: str, name: str, record: dict) -> None:
        line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        with self._lock, open(self.batch_dir(batch_id) / name, "ab") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def staged_path(self) -> Path:
        """A fresh path in the staging area, for an upload being received."""
        return self._staging() / f"upload-{uuid.uuid4().hex}"

    def staged_copy(self, path: Path) -> Path:
        """A copy of `path` in the staging area, to add as a file."""
        copy = self._staging() / f"copy-{uuid.uuid4().hex}"
        shutil.copyfile(path, copy)
        return copy

    def recover(self) -> None:
        """At start: drop uploads and deletions a crash interrupted."""
        shutil.rmtree(self.root / ".staging", ignore_errors=True)

    def _staging(self) -> Path:
        path = self.root / ".staging"
        path.mkdir(parents=True, exist_ok=True)
        return path


def created(record: dict) -> tuple[int, str]:
    """A record's place in creation order: to the nanosecond where it says, else to the second."""
    return record.get("_created_ns", record["created_at"] * 10**9), record["id"]


def public(record: dict) -> dict:
    """A File or Batch object as clients see it: without the owner's tenant and the runner's own marks."""
    return {k: v for k, v in record.items() if k != "tenant" and not k.startswith("_")}


def _is_id(value: str, prefix: str) -> bool:
    rest = value[len(prefix) :]
    plain = rest.replace("-", "").replace("_", "")
    return value.startswith(prefix) and 0 < len(rest) <= 64 and plain.isascii() and plain.isalnum()


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
