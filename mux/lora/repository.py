"""The adapter repository on disk (the disk tier), with immutable versions.

    <root>/<tenant>/<name>/adapter_config.json, adapter_model.safetensors    a hand-placed adapter (version 0)
    <root>/<tenant>/<name>/v<N>/{...the two files..., meta.json}            uploaded versions, never modified
    <root>/<tenant>/<name>/current -> v<N>                                  the version new requests use

An upload is staged under <root>/.staging/, validated, moved into v<N> and published by atomically
replacing the `current` symlink: a version either fully lands or is not there, and requests that already
resolved the old version keep reading its (unchanged) directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
import time
import uuid
from pathlib import Path

from mux.errors import AdapterNotFound
from mux.lora.adapter import CONFIG_FILE, WEIGHTS_FILE, adapter_key

_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_VERSION = re.compile(r"v(\d+)")
STAGING = ".staging"
CURRENT = "current"
META = "meta.json"


def valid_part(part: str) -> bool:
    return bool(_PART.fullmatch(part)) and ".." not in part


class AdapterRepository:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._lock = threading.Lock()
        self._sha: dict[str, str] = {}  # adapter_key stamp -> sha256 of a hand-placed adapter's weights

    def ids(self) -> list[str]:
        """Every adapter id (`tenant/name`) present on disk, sorted."""
        if not self.root.is_dir():
            return []
        found = []
        for tenant in self.root.iterdir():
            if not (valid_part(tenant.name) and tenant.is_dir()):
                continue
            found += [
                f"{tenant.name}/{d.name}"
                for d in tenant.iterdir()
                if valid_part(d.name) and self._resolve(d) is not None
            ]
        return sorted(found)

    def path(self, adapter_id: str) -> Path:
        """The directory of the version new requests should use."""
        tenant, _, name = adapter_id.partition("/")
        resolved = self._resolve(self.root / tenant / name) if valid_part(tenant) and valid_part(name) else None
        if resolved is None:
            raise AdapterNotFound(f"The model `{adapter_id}` does not exist.")
        return resolved

    def identify(self, path: str | Path) -> dict:
        """<root>/<tenant>/<name>[/v<N>] -> {"id": "tenant/name", "version": N}; paths elsewhere stay paths."""
        try:
            parts = Path(path).resolve().relative_to(self.root.resolve()).parts
        except ValueError:
            return {"id": str(path), "version": None}
        version = int(parts[2][1:]) if len(parts) > 2 and parts[2][1:].isdigit() else 0
        return {"id": "/".join(parts[:2]), "version": version}

    def directory(self, adapter_id: str) -> Path:
        """<root>/<tenant>/<name>: every version of the adapter lives below it."""
        tenant, _, name = adapter_id.partition("/")
        self.path(adapter_id)  # 404 if absent
        return self.root / tenant / name

    @staticmethod
    def _resolve(adapter_dir: Path) -> Path | None:
        current = adapter_dir / CURRENT
        if current.is_symlink() and (current / CONFIG_FILE).is_file():
            return adapter_dir / os.readlink(current)
        if (adapter_dir / CONFIG_FILE).is_file():
            return adapter_dir
        return None

    def meta(self, adapter_id: str) -> dict:
        path = self.path(adapter_id)
        meta_file = path / META
        if meta_file.is_file():
            return json.loads(meta_file.read_text())
        weights = path / WEIGHTS_FILE
        stamp = adapter_key(path)  # None: no weights file (e.g. pickle only), which requests will refuse
        if stamp is not None and stamp not in self._sha:  # hashed once per version of the file, not per listing
            self._sha[stamp] = _sha256(weights)
        return {
            "id": adapter_id,
            "version": 0,
            "sha256": self._sha.get(stamp),
            "bytes": weights.stat().st_size if stamp else 0,
        }

    # ---- uploads ----------------------------------------------------------------------------
    def staging_dir(self) -> Path:
        path = self.root / STAGING / uuid.uuid4().hex
        path.mkdir(parents=True)
        return path

    def install(self, tenant: str, name: str, staged: Path, info: dict) -> dict:
        """Move a validated staging directory in as the next version and publish it. Returns its meta."""
        if not (valid_part(tenant) and valid_part(name)):
            raise AdapterNotFound(f"invalid adapter id {tenant}/{name}")
        with self._lock:
            adapter_dir = self.root / tenant / name
            adapter_dir.mkdir(parents=True, exist_ok=True)
            versions = [int(m[1]) for d in adapter_dir.iterdir() if (m := _VERSION.fullmatch(d.name))]
            version = max(versions, default=0) + 1
            weights = staged / WEIGHTS_FILE
            meta = {
                "id": f"{tenant}/{name}",
                "version": version,
                "sha256": _sha256(weights),
                "bytes": weights.stat().st_size,
                "created": time.time(),
                **info,
            }
            (staged / META).write_text(json.dumps(meta))
            _fsync_dir_files(staged)
            os.rename(staged, adapter_dir / f"v{version}")
            link = adapter_dir / f".{CURRENT}-{uuid.uuid4().hex}"
            os.symlink(f"v{version}", link)
            os.replace(link, adapter_dir / CURRENT)  # the atomic publish
            _fsync(adapter_dir)
        return meta

    def delete(self, adapter_id: str) -> Path:
        """Remove an adapter (all versions). Returns the removed directory (already gone from disk)."""
        adapter_dir = self.directory(adapter_id)
        with self._lock:
            trash = self.root / STAGING / f"deleted-{uuid.uuid4().hex}"
            trash.parent.mkdir(parents=True, exist_ok=True)
            os.rename(adapter_dir, trash)  # atomic: gone for new requests at once
            shutil.rmtree(trash, ignore_errors=True)
        return adapter_dir

    def recover(self) -> list[str]:
        """At start, remove what a crash (kill -9) can leave behind; returns what was removed.

        - `.staging/`: uploads that were still arriving or being validated;
        - `v<N>` directories newer than `current` (moved in, never published: the upload was not acknowledged);
        - `.current-*` links made for a publish that did not happen.
        Published versions are never touched: they were fsynced before `current` pointed at them.
        """
        removed = [str(self.root / STAGING)] if (self.root / STAGING).exists() else []
        shutil.rmtree(self.root / STAGING, ignore_errors=True)
        if not self.root.is_dir():
            return removed
        for tenant in self.root.iterdir():
            if not (valid_part(tenant.name) and tenant.is_dir()):
                continue
            for adapter_dir in tenant.iterdir():
                if adapter_dir.is_dir() and not adapter_dir.is_symlink():
                    removed += self._recover_adapter(adapter_dir)
        return removed

    @staticmethod
    def _recover_adapter(adapter_dir: Path) -> list[str]:
        current = adapter_dir / CURRENT
        published = _VERSION.fullmatch(os.readlink(current)) if current.is_symlink() else None
        newest = int(published[1]) if published else 0
        removed = []
        for entry in adapter_dir.iterdir():
            m = _VERSION.fullmatch(entry.name)
            if (m and int(m[1]) > newest) or (entry.name.startswith(f".{CURRENT}-") and entry.is_symlink()):
                if entry.is_symlink():
                    entry.unlink()
                else:
                    shutil.rmtree(entry, ignore_errors=True)
                removed.append(str(entry))
        if removed and not any(adapter_dir.iterdir()):
            adapter_dir.rmdir()  # a first upload that never published leaves nothing
        return removed

    def verify(self, adapter_id: str) -> bool:
        """Whether the version new requests use has the weights its meta.json promises (sha256)."""
        meta = self.meta(adapter_id)
        return meta.get("sha256") == _sha256(self.path(adapter_id) / WEIGHTS_FILE)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir_files(path: Path) -> None:
    for f in path.iterdir():
        _fsync(f)
    _fsync(path)
