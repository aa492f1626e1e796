"""Damaged archives are refused as bad adapters (400), never installed with altered bytes, never a 500."""

from __future__ import annotations

import io
import tarfile
import zipfile

import pytest

from mux.errors import InvalidAdapter
from mux.server.archive import extract_adapter

FILES = ("adapter_config.json", "adapter_model.safetensors")


@pytest.fixture()
def members(tiny_adapters) -> list[tuple[str, bytes]]:
    return [(f, (tiny_adapters["r8-qv"] / f).read_bytes()) for f in FILES]


def _tar(members, mode="w:gz", extra=()) -> bytearray:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for name, data in [*members, *extra]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return bytearray(buf.getvalue())


def _zip(members, method=zipfile.ZIP_DEFLATED) -> bytearray:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as zf:
        for name, data in members:
            zf.writestr(name, data)
    return bytearray(buf.getvalue())


def _extract(data: bytes, tmp_path, name="a.tar.gz", max_weights=1 << 30):
    dst = tmp_path / "dst"
    dst.mkdir(exist_ok=True)
    extract_adapter(io.BytesIO(bytes(data)), name, dst, max_weights)
    return dst


@pytest.mark.parametrize("mode", ["w:gz", "w:xz", "w:bz2", "w"])
def test_each_tar_kind_extracts(members, tmp_path, mode):
    dst = _extract(_tar(members, mode), tmp_path)
    assert [(f, (dst / f).read_bytes()) for f in FILES] == members


def test_a_gzip_checksum_that_does_not_match_is_refused(members, tmp_path):
    """The deflate stream decodes fine; only the CRC-32 at the end tells the bytes were altered."""
    data = _tar(members)
    data[-8] ^= 0xFF  # the trailer: CRC-32 (4 bytes), then the length
    with pytest.raises(InvalidAdapter, match="CRC check failed"):
        _extract(data, tmp_path)


@pytest.mark.parametrize("mode", ["w:gz", "w:xz", "w:bz2"])
def test_flipped_bytes_anywhere_in_a_compressed_tar_are_refused(members, tmp_path, mode):
    data = _tar(members, mode)
    for at in range(20, len(data) - 8, max(1, len(data) // 40)):
        damaged = data.copy()
        damaged[at] ^= 0x55
        with pytest.raises(InvalidAdapter, match="archive"):
            _extract(damaged, tmp_path)


def test_ignored_tar_members_are_bounded_too(members, tmp_path):
    """A tar is one stream: an ignored member is decompressed to be skipped, so its size counts."""
    data = _tar(members, extra=[("optimizer.pt", b"\0" * (3 << 20))])
    assert (_extract(data, tmp_path, max_weights=4 << 20) / FILES[1]).is_file()
    with pytest.raises(InvalidAdapter, match="other members are too large"):
        _extract(data, tmp_path, max_weights=2 << 20)


def test_bytes_after_the_last_member_are_bounded(members, tmp_path):
    import gzip

    plain = bytes(_tar(members, "w")) + b"\0" * (4 << 20)
    with pytest.raises(InvalidAdapter, match="after its last member"):
        _extract(gzip.compress(plain), tmp_path, max_weights=2 << 20)


@pytest.mark.parametrize(
    "method",
    [zipfile.ZIP_DEFLATED, zipfile.ZIP_LZMA, zipfile.ZIP_BZIP2, zipfile.ZIP_STORED],
    ids=["deflate", "lzma", "bzip2", "stored"],
)
def test_flipped_bytes_in_a_zip_member_are_refused(members, tmp_path, method):
    data = _zip(members, method)
    start = data.index(b"adapter_model.safetensors") + len("adapter_model.safetensors")  # its local header's end
    for at in range(start + 40, start + 2000, 97):
        damaged = data.copy()
        damaged[at] ^= 0x55
        with pytest.raises(InvalidAdapter, match="archive"):
            _extract(damaged, tmp_path, name="a.zip")


def test_an_encrypted_zip_is_refused(members, tmp_path):
    data = _zip(members)
    for sig in (b"PK\x03\x04", b"PK\x01\x02"):  # every local and central header: set the "encrypted" flag bit
        at = data.find(sig)
        while at >= 0:
            flags = at + (6 if sig == b"PK\x03\x04" else 8)
            data[flags] |= 1
            at = data.find(sig, at + 4)
    with pytest.raises(InvalidAdapter, match="encrypted"):
        _extract(data, tmp_path, name="a.zip")
