"""The adapter repository on disk (the disk tier), with immutable versions.

    <root>/<tenant>/<name>/adapter_config.json, adapter_model.safetensors    a hand-placed adapter (version 0)
    <root>/<tenant>/<name>/v<N>/{...the two files..., meta.json}            uploaded versions, never modified
    <root>/<tenant>/<name>/current -> v<N>                                  the stable version
    <root>/<tenant>/<name>/traffic.json                                     a split between versions, if any

An upload is staged under <root>/.staging/, validated, moved into v<N> and published by atomically
replacing the `current` symlink (or, uploaded with `activate=false`, by the move alone): a version either fully
lands or is not there, and requests that already resolved the old version keep reading its (unchanged)
directory. A split (mux.lora.splits) is one file replaced atomically; where it and `current` disagree (a crash
between the two writes), the split wins and `recover` re-points `current`.
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

from mux.errors import AdapterNotFound, Conflict, InvalidRequest
from mux.lora.adapter import CONFIG_FILE, WEIGHTS_FILE, adapter_key
from mux.lora.splits import TRAFFIC, Split
from mux.runtime import durable

_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_VERSION = re.compile(r"v(\d+)")
STAGING = ".staging"
CURRENT = "current"
META = "meta.json"
MAX_VERSION = 10**9


def valid_part(part: str) -> bool:
    return bool(_PART.fullmatch(part)) and ".." not in part


class AdapterRepository:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._lock = threading.Lock()
        self._sha: dict[str, str] = {}  # adapter_key stamp -> sha256 of a hand-placed adapter's weights
        self._splits: dict[Path, tuple[tuple, Split]] = {}  # traffic.json -> (its stat, the split)

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
        """The directory of the stable version (of version N for `tenant/name@N`)."""
        return self._pick(adapter_id, lambda split: split.stable)

    def choose(self, adapter_id: str, session: str | None) -> Path:
        """The version directory one request uses: pinned by `@N`, else drawn from the split (sticky by session)."""
        return self._pick(adapter_id, lambda split: split.choose(adapter_id, session))

    def _pick(self, adapter_id: str, which) -> Path:
        adapter_dir, version = self._locate(adapter_id)
        if version is None:
            split = self._read_split(adapter_dir)
            if split is None:  # no split: `current`, or the hand-placed adapter
                resolved = self._resolve(adapter_dir)
                if resolved is None:
                    raise AdapterNotFound(f"The model `{adapter_id}` does not exist.")
                return resolved
            version = which(split)
        return self._version_dir(adapter_id, adapter_dir, version)

    def _locate(self, adapter_id: str) -> tuple[Path, int | None]:
        """`tenant/name[@N]` -> (<root>/<tenant>/<name>, N or None); a malformed name is absent (404)."""
        adapter_id, at, version = adapter_id.partition("@")
        tenant, _, name = adapter_id.partition("/")
        if not (valid_part(tenant) and valid_part(name)):
            raise AdapterNotFound(f"The model `{adapter_id}` does not exist.")
        if at and not (version.isascii() and version.isdigit() and int(version) <= MAX_VERSION):
            raise InvalidRequest(f"`@{version}` is not a version: pin one as `{adapter_id}@<number>`")
        return self.root / tenant / name, int(version) if at else None

    def _version_dir(self, adapter_id: str, adapter_dir: Path, version: int) -> Path:
        if self._resolve(adapter_dir) is None:
            raise AdapterNotFound(f"The model `{adapter_id.partition('@')[0]}` does not exist.")
        path = adapter_dir if version == 0 else adapter_dir / f"v{version}"
        if not (path / CONFIG_FILE).is_file() or (version > 0 and not (path / META).is_file()):
            raise AdapterNotFound(f"The model `{adapter_id.partition('@')[0]}` has no version {version}.")
        return path

    def versions(self, adapter_id: str) -> dict[int, Path]:
        """Every stored version of an adapter: number -> directory (0: a hand-placed adapter)."""
        adapter_dir = self.directory(adapter_id)
        found = {0: adapter_dir} if (adapter_dir / CONFIG_FILE).is_file() else {}
        for d in adapter_dir.iterdir():
            if (m := _VERSION.fullmatch(d.name)) and (d / META).is_file() and (d / CONFIG_FILE).is_file():
                found[int(m[1])] = d
        return dict(sorted(found.items()))

    # ---- traffic splits -------------------------------------------------------------------------
    def split(self, adapter_id: str) -> Split:
        """The adapter's split; without a traffic.json, all traffic on the stable (`current`) version."""
        adapter_dir = self.directory(adapter_id)
        split = self._read_split(adapter_dir)
        return split if split is not None else Split.single(self.identify(self.path(adapter_id))["version"])

    def traffic(self, adapter_id: str) -> Split | None:
        """The adapter's traffic.json split, or None (one stat: cheap enough for every request)."""
        return self._read_split(self._locate(adapter_id.partition("@")[0])[0])

    def update_split(self, adapter_id: str, change) -> Split:
        """Apply `change(split, versions) -> Split` atomically (one writer at a time) and return the new split."""
        with self._lock:
            split = change(self.split(adapter_id), set(self.versions(adapter_id)))
            self._write_split(self.directory(adapter_id), split)
        return split

    def _read_split(self, adapter_dir: Path) -> Split | None:
        path = adapter_dir / TRAFFIC
        try:
            stat = path.stat()
        except OSError:
            return None
        stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        cached = self._splits.get(path)
        if cached is None or cached[0] != stamp:
            cached = (stamp, Split.from_json(json.loads(path.read_text())))
            self._splits[path] = cached
        return cached[1]

    def _write_split(self, adapter_dir: Path, split: Split) -> None:
        """traffic.json replaced atomically, then `current` re-pointed at the stable version."""
        durable.write_json(adapter_dir / TRAFFIC, split.to_json())
        self._point_current(adapter_dir, split.stable)

    @staticmethod
    def _point_current(adapter_dir: Path, version: int) -> None:
        current = adapter_dir / CURRENT
        if version == 0 or (current.is_symlink() and os.readlink(current) == f"v{version}"):
            return
        link = adapter_dir / f".{CURRENT}-{uuid.uuid4().hex}"
        os.symlink(f"v{version}", link)
        os.replace(link, current)
        durable.fsync(adapter_dir)

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
        adapter_dir, _ = self._locate(adapter_id.partition("@")[0])
        if self._resolve(adapter_dir) is None:
            raise AdapterNotFound(f"The model `{adapter_id}` does not exist.")
        return adapter_dir

    @staticmethod
    def _resolve(adapter_dir: Path) -> Path | None:
        current = adapter_dir / CURRENT
        if current.is_symlink() and (current / CONFIG_FILE).is_file():
            return adapter_dir / os.readlink(current)
        if (adapter_dir / CONFIG_FILE).is_file():
            return adapter_dir
        return None

    def meta(self, adapter_id: str) -> dict:
        """The stable version's meta (version N's for `tenant/name@N`)."""
        return self.meta_of(adapter_id.partition("@")[0], self.path(adapter_id))

    def meta_of(self, adapter_id: str, path: Path) -> dict:
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

    def install(self, tenant: str, name: str, staged: Path, info: dict, activate: bool = True) -> dict:
        """Move a validated staging directory in as the next version; with `activate`, it takes all traffic (as
        a promote does). Returns its meta."""
        if not (valid_part(tenant) and valid_part(name)):
            raise AdapterNotFound(f"invalid adapter id {tenant}/{name}")
        adapter_id = f"{tenant}/{name}"
        with self._lock:
            adapter_dir = self.root / tenant / name
            if not activate and self._resolve(adapter_dir) is None:
                raise InvalidRequest(f"{adapter_id} has no version serving yet: upload its first with activate=true")
            adapter_dir.mkdir(parents=True, exist_ok=True)
            versions = [int(m[1]) for d in adapter_dir.iterdir() if (m := _VERSION.fullmatch(d.name))]
            version = max(versions, default=0) + 1
            weights = staged / WEIGHTS_FILE
            meta = {
                "id": adapter_id,
                "version": version,
                "sha256": _sha256(weights),
                "bytes": weights.stat().st_size,
                "created": time.time(),
                "activate": activate,
                **info,
            }
            (staged / META).write_text(json.dumps(meta))
            _fsync_dir_files(staged)
            os.rename(staged, adapter_dir / f"v{version}")  # stored: the publish of an inactive version
            durable.fsync(adapter_dir)
            split = self._read_split(adapter_dir)
            if activate and split is not None:
                self._write_split(adapter_dir, split.promoted(version, "upload"))
            elif activate:
                self._point_current(adapter_dir, version)  # the atomic publish
        return meta

    def delete_version(self, adapter_id: str, version: int) -> Path:
        """Remove one stored version; refused (409) for a version the split serves or may return to."""
        with self._lock:
            split = self.split(adapter_id)
            path = self.versions(adapter_id).get(version)
            if path is None:
                raise AdapterNotFound(f"The model `{adapter_id}` has no version {version}.")
            if split.weights.get(version, 0) > 0 or version in (split.stable, split.rollback_to):
                raise Conflict(
                    f"version {version} of {adapter_id} is in its traffic split (weights "
                    f"{ {str(v): w for v, w in split.weights.items()} }, stable {split.stable}, rollback to "
                    f"{split.rollback_to}): change the split first"
                )
            if version == 0:
                raise Conflict(f"version 0 of {adapter_id} is the hand-placed adapter: remove its files on disk")
            trash = self.root / STAGING / f"deleted-{uuid.uuid4().hex}"
            trash.parent.mkdir(parents=True, exist_ok=True)
            os.rename(path, trash)
            shutil.rmtree(trash, ignore_errors=True)
        return path

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
        - `v<N>` directories newer than any version ever served (moved in, never published: the upload was not
          acknowledged), except versions uploaded with activate=false, which the move itself published;
        - `.current-*` links and `.traffic.json-*` files made for a publish or a split change that did not happen.
        A traffic split's stable version is re-pointed as `current`, if a crash came between the two writes.
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

    def _recover_adapter(self, adapter_dir: Path) -> list[str]:
        split = self._read_split(adapter_dir) if (adapter_dir / TRAFFIC).is_file() else None
        if split is not None:
            self._point_current(adapter_dir, split.stable)  # a crash between the split's write and `current`'s
        current = adapter_dir / CURRENT
        published = _VERSION.fullmatch(os.readlink(current)) if current.is_symlink() else None
        newest = max(int(published[1]) if published else 0, split.newest if split else 0)
        kept = set() if split is None else {*split.weights, split.stable, split.rollback_to}
        removed = []
        for entry in adapter_dir.iterdir():
            m = _VERSION.fullmatch(entry.name)
            unpublished = m and int(m[1]) > newest and int(m[1]) not in kept and not _stored_inactive(entry)
            leftover = entry.name.startswith((f".{CURRENT}-", f".{TRAFFIC}-"))
            if unpublished or leftover:
                if entry.is_symlink() or entry.is_file():
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


def _stored_inactive(version_dir: Path) -> bool:
    """An upload with activate=false: published by its move into v<N> (its meta was fsynced before)."""
    try:
        return json.loads((version_dir / META).read_text()).get("activate") is False
    except (OSError, ValueError):
        return False


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir_files(path: Path) -> None:
    for f in path.iterdir():
        durable.fsync(f)
    durable.fsync(path)
