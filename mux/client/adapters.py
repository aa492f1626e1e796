"""`mux adapters list|show|upload|rm`: the adapters a key may use, one adapter's metadata, an upload (with its
progress bar), a delete."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from mux.client.http import ClientError, call, resolve
from mux.client.rollout import traffic_text
from mux.client.tables import date, fields, print_json, size, table

if TYPE_CHECKING:  # imported when a command runs: `mux serve` does not need httpx
    import httpx

FILES = ("adapter_config.json", "adapter_model.safetensors")  # the upload route's file fields
PROGRESS_BYTES = 16 << 20  # on a terminal, uploads at least this large show a progress bar


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    adapters = sub.add_parser("adapters", help="list, show, upload or delete adapters on a server")
    verbs = adapters.add_subparsers(dest="verb", required=True)
    verbs.add_parser("list", parents=[common], help="the adapters this key may use")
    show = verbs.add_parser("show", parents=[common], help="one adapter's metadata")
    show.add_argument("name", help="TENANT/NAME (or NAME, if one adapter visible to this key has that name)")
    upload = verbs.add_parser("upload", parents=[common], help="upload an adapter directory as a new version")
    upload.add_argument("dir", type=Path, help=f"a PEFT adapter directory: {' + '.join(FILES)}")
    upload.add_argument("--name", required=True, help="TENANT/NAME (a tenant key may give NAME: its own tenant)")
    upload.add_argument(
        "--no-activate",
        action="store_true",
        help="send activate=false: store the version without moving traffic to it (then `mux rollout split`)",
    )
    upload.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"a progress bar on stderr (default: on a terminal, for uploads of {PROGRESS_BYTES >> 20} MiB or more)",
    )
    rm = verbs.add_parser("rm", parents=[common], help="delete an adapter, every version (refused while in use)")
    rm.add_argument("name", help="TENANT/NAME (or NAME, as for show)")


def _list(http: httpx.Client, args: argparse.Namespace) -> int:
    body = call(http, "GET", "/v1/adapters").json()
    if args.json:
        print_json(body)
        return 0
    rows = [
        [
            m["id"],
            str(m.get("version", "-")),
            str(m.get("rank") or "-"),
            _targets(m.get("target_modules")),
            size(m.get("bytes")),
            (m.get("sha256") or "-")[:12],
            date(m.get("created")),
        ]
        for m in body["data"]
    ]
    print(table(["ID", "VERSION", "RANK", "TARGETS", "SIZE", "SHA256", "CREATED"], rows) if rows else "no adapters")
    return 0


def _targets(modules: list[str] | None) -> str:
    return ",".join(m.removesuffix("_proj") for m in modules) if modules else "-"


def _show(http: httpx.Client, args: argparse.Namespace) -> int:
    meta = call(http, "GET", f"/v1/adapters/{resolve(http, args.name)}").json()
    if args.json:
        print_json(meta)
        return 0
    shown = {
        **meta,
        "target_modules": ", ".join(meta["target_modules"]) if meta.get("target_modules") else None,
        "bytes": f"{meta['bytes']} ({size(meta['bytes'])})" if meta.get("bytes") is not None else None,
        "created": date(meta.get("created")) if meta.get("created") else None,
        **({"versions": ", ".join(str(v["version"]) for v in meta["versions"])} if "versions" in meta else {}),
        **({"traffic": traffic_text(meta["traffic"])} if "traffic" in meta else {}),
    }
    print(fields(shown))
    return 0


def _rm(http: httpx.Client, args: argparse.Namespace) -> int:
    body = call(http, "DELETE", f"/v1/adapters/{resolve(http, args.name)}").json()
    if args.json:
        print_json(body)
    else:
        print(f"deleted {body['id']}")
    return 0


def _upload(http: httpx.Client, args: argparse.Namespace) -> int:
    paths = [args.dir / f for f in FILES]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ClientError(f"not an adapter directory, missing: {', '.join(missing)}")
    total = sum(p.stat().st_size for p in paths)
    show = args.progress if args.progress is not None else total >= PROGRESS_BYTES and sys.stderr.isatty()
    form = {"name": args.name, **({"activate": "false"} if args.no_activate else {})}
    with _progress(total, show, args.name) as bar, contextlib.ExitStack() as files:
        opened = {p.name: (p.name, _Counted(files.enter_context(open(p, "rb")), bar)) for p in paths}
        # no write timeout, so a slow link is not cut mid-body; the answer (validation included) gets --timeout
        timeout = (args.timeout, args.timeout, None, args.timeout)  # httpx: connect, read, write, pool
        meta = call(http, "POST", "/v1/adapters", data=form, files=opened, timeout=timeout).json()
    if args.json:
        print_json(meta)
        return 0
    stored, sha = size(meta.get("bytes")), (meta.get("sha256") or "-")[:12]
    print(f"uploaded {meta['id']} version {meta['version']} (rank {meta.get('rank')}, {stored}, sha256 {sha})")
    return 0


@contextlib.contextmanager
def _progress(total: int, show: bool, name: str) -> Iterator:
    if not show:
        yield None
        return
    from tqdm import tqdm

    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=name, file=sys.stderr) as bar:
        yield bar


class _Counted:
    """A binary file whose reads advance a progress bar: httpx streams multipart file fields with read()."""

    def __init__(self, file, bar) -> None:
        self._file, self._bar = file, bar

    def read(self, size: int = -1) -> bytes:
        chunk = self._file.read(size)
        if self._bar is not None:
            self._bar.update(len(chunk))
        return chunk

    def seek(self, offset: int, whence: int = 0) -> int:
        if self._bar is not None and offset == 0 and whence == 0:  # httpx rewinds before sending: count anew
            self._bar.update(-self._file.tell())
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()

    def fileno(self) -> int:
        return self._file.fileno()


VERBS = {"list": _list, "show": _show, "upload": _upload, "rm": _rm}
