"""OpenMP and allocator settings of this process: one OpenMP team for torch and the C kernels, and glibc's heap
kept instead of trimmed.

- keep_freed_memory: glibc returns large freed blocks to the OS and page-faults them back on the next step;
  keeping them cut a 1920-token SmolLM2 prefill from 3.8 s to 2.5 s.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import sys
import threading

import torch


def file_mappings() -> list[tuple[int, int, str]]:
    """(start, end, path) of each file this process has mapped (/proc/self/maps; none off Linux)."""
    out = []
    with contextlib.suppress(OSError), open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)  # the path, the sixth field, may hold spaces
            if len(fields) == 6 and fields[5].startswith("/"):
                lo, hi = fields[0].split("-")
                out.append((int(lo, 16), int(hi, 16), fields[5].rstrip("\n")))
    return out


_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_serial = threading.local()


def serial_torch_here() -> None:
    """Make torch ops on the calling thread single-threaded (only this thread's OpenMP setting changes).

    For threads that touch tensors beside the engine's (adapter reads and validation, slot copies): a
    parallel region there would start a second OpenMP team, and with more OpenMP threads than cores libgomp
    stops spinning: requests 1.9× slower on 2 cores (`python -m bench.threads`).
    """
    if getattr(_serial, "done", False):
        return
    _serial.done = True
    torch.get_num_threads()  # torch sets this thread's OpenMP thread count lazily: let it happen first
    gomp = libgomp()
    if gomp is not None:
        gomp.omp_set_num_threads(1)


def parallel_torch_here() -> None:
    """The calling thread is an engine's torch thread: `serial_torch_here` must never make it serial."""
    _serial.done = True


@functools.cache
def libgomp():
    """The libgomp torch loaded (None with another OpenMP runtime, or none)."""
    for _, _, path in file_mappings():
        if "libgomp" in path.rsplit("/", 1)[-1]:
            with contextlib.suppress(OSError):
                return ctypes.CDLL(path)
    return None


def keep_freed_memory() -> bool:
    """Ask glibc to reuse freed activation buffers instead of unmapping them (process-wide; Linux only)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        # all three are needed (measured): big blocks from the heap, never trimmed, grown in large steps
        settings = ((_M_MMAP_THRESHOLD, 1 << 30), (_M_TRIM_THRESHOLD, 1 << 36), (_M_TOP_PAD, 1 << 30))
        return all(libc.mallopt(option, value) == 1 for option, value in settings)
    except (OSError, AttributeError):
        return False
