"""Safe extraction of an uploaded adapter archive (.tar.gz / .zip) into a staging directory.

Only the two adapter files are taken, as regular files, at the top level or inside one folder. Absolute
paths, `..`, links, devices, duplicates and anything else are refused, and every member is copied through
a byte counter, so a compression bomb stops at the limit instead of filling the disk. A compressed tar is read
to its end, so its checksum (gzip's CRC-32, xz's and bzip2's own) is checked: a damaged archive whose bytes
still decompress is refused, not installed with altered weights. Damage the decompressor finds is a 400 too.
"""

from __future__ import annotations

import lzma
import stat
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from mux.errors import InvalidAdapter
from mux.lora.adapter import CONFIG_FILE, MAX_CONFIG_BYTES, PICKLE_REFUSED, WEIGHTS_FILE

MAX_MEMBERS = 16
# what a decompressor or archive reader raises on damaged bytes (bz2: OSError; an encrypted zip: RuntimeError)
_DAMAGED = (EOFError, OSError, zlib.error, lzma.LZMAError, RuntimeError, ValueError, NotImplementedError)


def extract_adapter(archive: BinaryIO, filename: str, dst: Path, max_weights: int) -> None:
    limits = {CONFIG_FILE: MAX_CONFIG_BYTES, WEIGHTS_FILE: max_weights}
    archive.seek(0)
    if zipfile.is_zipfile(archive):
        archive.seek(0)
        _extract_zip(archive, dst, limits)
    else:
        archive.seek(0)
        try:
            with tarfile.open(fileobj=archive, mode="r:*") as tf:
                _extract_tar(tf, dst, limits, max_weights)
        except (tarfile.TarError, *_DAMAGED) as e:
            raise InvalidAdapter(f"archive {filename!r} is not a readable .tar.gz or .zip: {e}") from None
    missing = [f for f in limits if not (dst / f).is_file()]
    if missing:
        raise InvalidAdapter(f"archive {filename!r} lacks {', '.join(missing)}")


def _member_target(name: str, kind: str, seen: set[str]) -> str | None:
    """The adapter file a member provides (kind: file | dir | other); None for folders and ignored files."""
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or "\\" in name:
        raise InvalidAdapter(f"archive member {name!r} has an unsafe path")
    if kind == "dir":
        return None
    if kind != "file":
        raise InvalidAdapter(f"archive member {name!r} is not a regular file (links and devices are refused)")
    if len(path.parts) > 2:
        raise InvalidAdapter(f"archive member {name!r} is nested too deep (files at the top or in one folder)")
    if path.name == "adapter_model.bin":
        raise InvalidAdapter(PICKLE_REFUSED)
    if path.name not in (CONFIG_FILE, WEIGHTS_FILE):
        return None  # READMEs and the like are ignored, not extracted
    if path.name in seen:
        raise InvalidAdapter(f"archive holds {path.name} twice")
    seen.add(path.name)
    return path.name


def _copy_limited(src: BinaryIO, dst: Path, limit: int, name: str) -> None:
    written = 0
    with open(dst, "wb") as out:
        while chunk := src.read(1 << 20):
            written += len(chunk)
            if written > limit:
                raise InvalidAdapter(f"archive member {name} is too large (over {limit} bytes uncompressed)")
            out.write(chunk)


def _extract_tar(tf: tarfile.TarFile, dst: Path, limits: dict[str, int], max_other: int) -> None:
    """`max_other`: bytes the ignored members (a checkpoint's optimizer.pt, ...) may hold together: a tar is
    one stream, so skipping a member still decompresses it."""
    seen: set[str] = set()
    other = 0
    for count, member in enumerate(tf, start=1):
        if count > MAX_MEMBERS:
            raise InvalidAdapter(f"archive has more than {MAX_MEMBERS} members")
        kind = "dir" if member.isdir() else "file" if member.isreg() else "other"
        target = _member_target(member.name, kind, seen)
        if target is not None:
            _copy_limited(tf.extractfile(member), dst / target, limits[target], target)
        elif (other := other + member.size) > max_other:
            raise InvalidAdapter(f"archive's other members are too large (over {max_other} bytes uncompressed)")
    tail = 0  # to the end of the stream: the decompressor checks the checksum there
    while chunk := tf.fileobj.read(1 << 20):
        if (tail := tail + len(chunk)) > max_other:
            raise InvalidAdapter(f"archive has over {max_other} bytes after its last member")


def _extract_zip(fileobj: BinaryIO, dst: Path, limits: dict[str, int]) -> None:
    seen: set[str] = set()
    try:
        with zipfile.ZipFile(fileobj) as zf:
            infos = zf.infolist()
            if len(infos) > MAX_MEMBERS:
                raise InvalidAdapter(f"archive has more than {MAX_MEMBERS} members")
            for info in infos:
                mode = info.external_attr >> 16  # unix mode; its file-type bits are set by some archivers only
                special = stat.S_IFMT(mode) and not stat.S_ISREG(mode)  # a symlink, device, ...
                kind = "dir" if info.is_dir() else "other" if special else "file"
                target = _member_target(info.filename, kind, seen)
                if target is not None:
                    with zf.open(info) as src:
                        _copy_limited(src, dst / target, limits[target], target)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, *_DAMAGED) as e:
        raise InvalidAdapter(f"archive is not a readable .zip: {e}") from None
