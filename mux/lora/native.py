"""The CPU LoRA kernel in C (`lora_cpu.c`): built once with the machine's C compiler, called through ctypes.

Decode steps give each adapter a few rows. torch's batched matmuls on such rows run far below the memory
bandwidth that reading the adapters' weights needs, and the blocked layout adds gathers, pads and a scatter; the
C loop reads each used slot's A and B in place at the slot's own rank. Side by side per step in
`python -m bench.lora_kernel`. The library is built at first use into `<cache>/native/` (≈0.3 s; keyed by the
source, the flags and the CPU, since it is built for this CPU) and links the libgomp torch already loaded, so
both share one OpenMP thread team (see `mux/engine/torch_thread.py`). With no compiler, a failed build, or torch
on another OpenMP runtime, `library()` is None and the torch kernel serves.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from mux.config import cache_root
from mux.model.cpu import libgomp

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("lora_cpu.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
ITEM_ROWS = 16  # rows per work item: a long prefill run is split so both cores share it
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p


@dataclass(frozen=True, slots=True)
class NativeRows:
    """One step's rows for the C kernel, as work items of at most ITEM_ROWS rows of one slot."""

    tensors: tuple[torch.Tensor, ...]  # slot [I], rank [I], off [I+1], rows [N] int64: kept alive for the pointers
    pointers: tuple[int, int, int, int]
    items: int


def native_rows(groups: dict[int, list[int]], ranks: dict[int, int]) -> NativeRows:
    """groups: slot -> its rows; ranks: slot -> the rank to compute at (trailing rank rows are zero padding)."""
    slot, rank, off, rows = [], [], [0], []
    for s, rs in groups.items():
        for i in range(0, len(rs), ITEM_ROWS):
            rows += rs[i : i + ITEM_ROWS]
            slot.append(s)
            rank.append(ranks[s])
            off.append(len(rows))
    tensors = tuple(torch.tensor(v, dtype=torch.int64) for v in (slot, rank, off, rows))
    return NativeRows(tensors, tuple(t.data_ptr() for t in tensors), len(slot))


def lora_add(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, rows: NativeRows) -> None:
    """y [T, out] += (x A_slot) B_slot for the rows; x [T, in]; a [S, R, in], b [S, R, out]: CPU float32."""
    if x.stride(1) != 1:
        x = x.contiguous()
    assert y.stride(1) == 1 and a.is_contiguous() and b.is_contiguous() and x.dtype == y.dtype == torch.float32
    _, max_rank, in_f = a.shape
    library().mux_lora_add(
        x.data_ptr(), x.stride(0), y.data_ptr(), y.stride(0), a.data_ptr(), b.data_ptr(),
        max_rank, in_f, b.shape[2], *rows.pointers, rows.items,
    )  # fmt: skip


@functools.cache
def library() -> ctypes.CDLL | None:
    """The built kernel, or None (the reason is logged once)."""
    if libgomp() is None:
        log.info("native LoRA kernel off: torch does not run on libgomp")
        return None
    try:
        path = _build()
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", None) or b""
        log.warning("native LoRA kernel off (%s %s); using torch's kernel", e, detail.decode(errors="replace")[-400:])
        return None
    lib.mux_lora_add.restype = None
    lib.mux_lora_add.argtypes = [_PTR, _I64, _PTR, _I64, _PTR, _PTR, _I64, _I64, _I64, _PTR, _PTR, _PTR, _PTR, _I64]
    return lib


def _build() -> Path:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler (set CC)")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join((compiler, *FLAGS, platform.machine(), _cpu_flags())).encode())
    out_dir = cache_root() / "native"
    target = out_dir / f"lora_cpu-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".so.tmp")
    os.close(fd)
    try:
        subprocess.run([compiler, *FLAGS, "-o", tmp, str(SOURCE)], check=True, capture_output=True, timeout=120)
        os.replace(tmp, target)  # atomic: concurrent builders each publish a whole library
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


def _cpu_flags() -> str:
    """The CPU's feature flags (the library is built with -march=native for this CPU)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()
