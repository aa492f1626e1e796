"""CPU tuning, applied to a plain model afterwards (gpt-fast style): prepacked linears, allocator settings.

- PackedLinear: fp32 weights reordered once into oneDNN's blocked layout. Measured on this 2-core machine
  (M=64 decode rows): 576→1536 went from 130 to 190 GFLOP/s, the 49152-wide lm_head from 66 to 182 GFLOP/s;
  prefill shapes gain ≈1.5×. At a few rows (a decode step of 1-4 sequences) a linear is a stream over its
  weights, which the packed GEMM reads at about half the memory's speed: there a C kernel (mux/csrc/linear.c,
  given as `few_rows`) reads the plain weights instead (`python -m bench.small_linear`). The plain weights are
  the model's own tensors, kept beside the packed ones: for a model loaded from fp32 safetensors (the embedded
  default) they are the file's mapped pages, no memory of their own (`plain_weights_are_free`); converted from
  another dtype they would be one more copy of the linears, so by default the kernel is not used there.
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
from collections.abc import Callable

import torch
from torch import nn

_BATCH_HINT = 64  # oneDNN picks its blocking for this many rows; any row count works
FEW_ROWS = 4  # up to this many rows the `few_rows` kernel serves (mux/csrc/linear.c; its limit too)


class PackedLinear(nn.Module):
    def __init__(self, linear: nn.Linear, few_rows: Callable | None = None) -> None:
        """`few_rows`: the C kernel `mux_small_linear` for inputs of ≤ FEW_ROWS rows, or None (oneDNN for all)."""
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        weight = linear.weight.detach()  # [out, in]
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, _BATCH_HINT)  # opaque
        self.bias = None if linear.bias is None else linear.bias.detach()
        plain = few_rows is not None and weight.is_contiguous() and (self.bias is None or self.bias.is_contiguous())
        self.few_rows = few_rows if plain else None
        self.weight = weight if plain else None

    def kernel_rows(self, x: torch.Tensor) -> int:
        """How many rows of x [..., in] the few-row kernel takes: all of them (1..FEW_ROWS) for a contiguous input
        of this linear's width, else 0 (oneDNN serves it; the kernel trusts its shapes)."""
        if self.few_rows is None or x.shape[-1] != self.in_features or not x.is_contiguous():
            return 0
        rows = x.numel() // self.in_features
        return rows if rows <= FEW_ROWS else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [..., in]
        if rows := self.kernel_rows(x):
            y = x.new_empty(*x.shape[:-1], self.out_features)  # [..., out]
            bias = None if self.bias is None else self.bias.data_ptr()
            n, k = self.out_features, self.in_features
            self.few_rows(x.data_ptr(), k, y.data_ptr(), n, self.weight.data_ptr(), bias, rows, k, n)
            return y
        return self.onednn(x)

    def onednn(self, x: torch.Tensor) -> torch.Tensor:  # x [..., in] -> [..., out]
        """The prepacked GEMM, whatever the row count."""
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def can_pack(model: nn.Module) -> bool:
    p = next(model.parameters())
    return p.device.type == "cpu" and p.dtype == torch.float32 and torch.backends.mkldnn.is_available()


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


def file_mapped(tensors: list[torch.Tensor]) -> bool:
    """Whether every tensor's memory lies in a mapped file (as fp32 safetensors loads are): pages the kernel can
    drop and read again, no memory of their own. Linux; False elsewhere."""
    spans = [(lo, hi) for lo, hi, _ in file_mappings()]
    return bool(tensors) and all(
        any(lo <= t.data_ptr() and t.data_ptr() + t.nbytes <= hi for lo, hi in spans) for t in tensors
    )


def plain_weights_are_free(model: nn.Module) -> bool:
    """Whether keeping the linears' plain weights beside the packed ones costs no memory (see file_mapped)."""
    return file_mapped([m.weight for m in model.modules() if type(m) is nn.Linear])


def pack_linears(model: nn.Module, few_rows: Callable | None = None) -> int:
    """Replace every nn.Linear in `model` (including ones wrapped by LoRA layers) by a PackedLinear (`few_rows`:
    see PackedLinear)."""
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, PackedLinear(getattr(owner, child), few_rows))
    return len(names)


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
