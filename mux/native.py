"""The CPU kernels in C (`mux/csrc/*.c`): built once with the machine's C compiler, loaded through ctypes.

- `lora.c`: the multi-LoRA kernel (called from `mux/lora/ops.py`) and the slot load's copy (`mux/lora/layers.py`);
- `attention.c`: decode attention over the paged KV cache (called from `mux/engine/kv_cache.py`);
- `sampling.c`: greedy tokens and log-normalisers of a step's logits (called from `mux/engine/sampler.py`);
- `layers.c`: a decoder layer's RMSNorms and RoPE (called from `mux/model/cpu_layers.py`);
- `linear.c`: the linears, over fp32, bf16, int8 or int4 weights packed in panels of 16 output features
  (`mux/model/cpu.py`'s packed linears), and at 1-8 rows a linear with its LoRA deltas in the same call
  (`mux/lora/ops.py`);
- `lora.h`: the LoRA shrink and expand both LoRA paths share;
- `simd.h`: the vector helpers they share.

On this 2-core CPU both replace many small torch calls (a batched matmul per layer per adapter group, an SDPA
call per (sequence, head)) whose per-call cost dwarfs the arithmetic; `python -m bench.lora_kernel` and
`python -m bench.attention` measure them side by side. The library is built at first use into `<cache>/native/`
(≈0.6 s; keyed by the sources, the flags and the CPU, since it is built for this CPU with -march=native) and
links the libgomp torch already loaded, so both share one OpenMP thread team (see `mux/engine/torch_thread.py`).
With no compiler, a failed build, or torch on another OpenMP runtime, `library()` is None and torch's own
kernels serve. ctypes releases the GIL for the call.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from mux.config import cache_root
from mux.runtime.cpu import libgomp
from mux.runtime.picks import cpu_flags

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
SOURCES = sorted(CSRC.glob("*.c"))
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
STALE_S = 30 * 86400  # a built library unused this long is deleted by the next build
_I64, _PTR, _F32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
SIGNATURES = {  # name -> (restype, argtypes), as declared in the C sources
    "mux_lora_add": (
        None,
        [_PTR, _I64, _PTR, _I64, _PTR, _PTR, _PTR, _I64, _I64, _I64, _PTR, _PTR, _PTR, _PTR, _I64],
    ),
    "mux_decode_attention": (
        ctypes.c_int,
        [_PTR, _I64, _I64, _PTR, _PTR, _PTR, _I64, _PTR, _I64, _I64, _I64, _I64, _I64, _F32, _PTR],
    ),
    "mux_argmax_logsumexp": (None, [_PTR, _I64, _I64, _I64, _PTR, _PTR]),
    "mux_copy_pieces": (None, [_PTR, _PTR, _PTR, _PTR, _I64]),
    "mux_rms_norm": (None, [_PTR, _I64, _PTR, _I64, _PTR, _PTR, _I64, _I64, _I64, _F32]),
    "mux_rope": (None, [_PTR, _I64, _I64, _PTR, _I64, _I64, _PTR, _PTR, _I64, _I64, _I64]),
    "mux_linear": (None, [_PTR, _I64, _PTR, _I64, _PTR, _PTR, _I64, _I64, _I64]),
    "mux_linear_lora": (
        None,
        [_PTR, _I64, _PTR, _I64, _PTR, _PTR, _I64, _I64, _I64, _PTR, _PTR, _PTR, _I64, _PTR, _PTR],
    ),
}


def serves(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether the C kernels take tensors of this device and dtype here (CPU float32, and the library built)."""
    return torch.device(device).type == "cpu" and dtype == torch.float32 and library() is not None


@functools.cache
def library() -> ctypes.CDLL | None:
    """The built kernels, or None (the reason is logged once)."""
    if libgomp() is None:
        log.info("native CPU kernels off: torch does not run on libgomp")
        return None
    try:
        lib = ctypes.CDLL(str(_build()))
    except (OSError, subprocess.SubprocessError) as e:
        detail = (getattr(e, "stderr", None) or b"").decode(errors="replace")[-400:]
        log.warning("native CPU kernels off (%s %s); torch's kernels serve", e, detail)
        return None
    for name, (restype, argtypes) in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


def _compiler() -> str:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler (set CC)")
    return compiler


@functools.cache
def source_digest() -> str:
    """A digest of the kernels' sources, compiler, flags and CPU: the built library's name, and part of the key of
    the kernel picks measured with it (mux/runtime/picks.py)."""
    key = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(CSRC.glob("*.[ch]"))))
    key.update(" ".join((_compiler(), *FLAGS, platform.machine(), cpu_flags())).encode())
    return key.hexdigest()[:16]


def _build() -> Path:
    compiler = _compiler()
    out_dir = cache_root() / "native"
    target = out_dir / f"mux-cpu-{source_digest()}.so"
    if target.exists():
        with contextlib.suppress(OSError):
            os.utime(target)  # in use: a later build's pruning keeps it
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".so.tmp")
    os.close(fd)
    try:
        cmd = [compiler, *FLAGS, "-o", tmp, *map(str, SOURCES), "-lm"]
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)
        os.replace(tmp, target)  # atomic: concurrent builders each publish a whole library
    finally:
        Path(tmp).unlink(missing_ok=True)
    _prune(out_dir, target)
    return target


def _prune(out_dir: Path, keep: Path) -> None:
    """Delete libraries (and crashed builds' temporaries) unused for STALE_S: every source change builds a new
    one. A library another install still loads is touched at each load, so it stays; one deleted while mapped
    stays valid for the process that mapped it (Linux unlinks, it does not unmap)."""
    cutoff = time.time() - STALE_S
    for path in [*out_dir.glob("mux-cpu-*.so"), *out_dir.glob("*.so.tmp")]:
        with contextlib.suppress(OSError):
            if path != keep and path.stat().st_mtime < cutoff:
                path.unlink()
