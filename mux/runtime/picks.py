"""Kernel picks measured on this machine, kept on disk: which kernel serves each (operation, shape, row bucket).

The fastest CPU kernel depends on the CPU (a C GEMM that beat oneDNN on an AMD EPYC ran at 0.66× of it on a Xeon
with AMX) and on the row count, so nothing is hard-wired: the engine times the candidates at first use and keeps
the fastest (mux/model/cpu.py). Picks live in `<cache>/picks/<machine key>.json`, keyed by the CPU model, its
flags, the thread count, torch's version and the C kernels' sources; a file of another machine, a truncated or
edited one, or one naming a kernel that does not exist is ignored and measured again, never trusted.

`force` overrides every pick of one operation (tests and benches compare kernels this way, not through config).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import platform
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from mux.config import cache_root
from mux.runtime import durable

log = logging.getLogger(__name__)

ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # a step of r rows is served by the first bucket >= r
FORMAT = 1  # the file's layout; another value is ignored
_lock = threading.RLock()
_forced: dict[str, object] = {}
_memory: dict[str, dict] = {}  # path -> the file's entries, as read or written by this process


def bucket(rows: int) -> int:
    """The row bucket a call of `rows` rows is served by (past the largest: the largest)."""
    for b in ROW_BUCKETS:
        if rows <= b:
            return b
    return ROW_BUCKETS[-1]


def cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_flags() -> str:
    """The CPU's feature flags line (what a kernel built with -march=native, or oneDNN's dispatch, depends on)."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        return next((line.strip() for line in f if line.startswith(("flags", "Features"))), "")
    return platform.processor()


def has_flags(*names: str) -> bool:
    flags = set(cpu_flags().split(":", 1)[-1].split())
    return all(n in flags for n in names)


def machine_key(sources: str) -> dict[str, str]:
    """What a pick depends on besides the shape. `sources`: a digest of the C kernels' sources (or "")."""
    return {
        "cpu": cpu_model(),
        "flags": hashlib.sha256(cpu_flags().encode()).hexdigest()[:16],
        "threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "kernels": sources,
    }


@contextlib.contextmanager
def force(op: str, kernel: object) -> Iterator[None]:
    """Within the block the picks of `op` are `kernel` instead of measured ones (None: measured as usual). "linear":
    a kernel name or a table {bucket: kernel}; "weight_dtype": float32 or bfloat16 for `--dtype auto`."""
    before = _forced.get(op)
    if kernel is None:
        _forced.pop(op, None)
    else:
        _forced[op] = kernel
    try:
        yield
    finally:
        if before is None:
            _forced.pop(op, None)
        else:
            _forced[op] = before


def forced(op: str) -> object:
    return _forced.get(op)


def choice(op: str, default: str) -> object:
    """An internal choice that benches and tests may force (`force(op, ...)`), else `default`: "lora_kernel" (c |
    torch), "lora_fused" (fused | two_calls: a few-row linear and its deltas in one C call or two), "attention"
    (c | sdpa), "layers" (c | torch), "decode" (loop | forward)."""
    value = _forced.get(op)
    return default if value is None else value


class PickCache:
    """One machine's picks: {entry name: {"picks": {bucket: kernel}, "us": {kernel: {bucket: µs}}}}."""

    def __init__(self, key: dict[str, str], root: Path | None = None) -> None:
        self.key = key
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        self.path = (root or cache_root() / "picks") / f"{digest}.json"
        self.rejected = 0  # entries (or whole files) ignored as stale, corrupt or naming unknown kernels

    def get(self, name: str, kernels: tuple[str, ...]) -> dict | None:
        """The entry `name` if stored, whole and naming only `kernels`, else None."""
        entry = self._entries().get(name)
        if entry is None:
            return None
        if not _valid(entry, kernels):
            self.rejected += 1
            log.warning("kernel picks: ignoring the stored entry %s (stale or corrupt); measuring again", name)
            return None
        return {"picks": {int(b): k for b, k in entry["picks"].items()}, "us": entry["us"]}

    def put(self, name: str, picks: dict[int, str], us: dict[str, dict[int, float]]) -> None:
        entry = {"picks": {str(b): k for b, k in picks.items()}, "us": {k: {str(b): t for b, t in v.items()}
                                                                          for k, v in us.items()}}  # fmt: skip
        with _lock:
            entries = dict(self._entries())
            entries[name] = entry
            _memory[str(self.path)] = entries
            self._write(entries)

    def _entries(self) -> dict:
        with _lock:
            if (cached := _memory.get(str(self.path))) is not None:
                return cached
            entries = self._read()
            _memory[str(self.path)] = entries
            return entries

    def _read(self) -> dict:
        try:
            data = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, RecursionError) as e:
            self.rejected += 1
            log.warning("kernel picks: %s unreadable (%s); measuring again", self.path, type(e).__name__)
            return {}
        if not (isinstance(data, dict) and data.get("format") == FORMAT and data.get("key") == self.key):
            self.rejected += 1
            log.warning("kernel picks: %s is another machine's or format's; measuring again", self.path)
            return {}
        entries = data.get("entries")
        return entries if isinstance(entries, dict) else {}

    def _write(self, entries: dict) -> None:
        """Atomically (temp file, fsync, rename): a crash leaves the old file or the new one."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            data = {"format": FORMAT, "key": self.key, "entries": entries}
            durable.write_json(self.path, data, indent=1, sort_keys=True)
        except OSError as e:  # a read-only cache: the picks serve this process only
            log.warning("kernel picks: could not write %s (%s)", self.path, e)


def _valid(entry, kernels: tuple[str, ...]) -> bool:
    if not isinstance(entry, dict) or not isinstance(entry.get("picks"), dict) or not isinstance(entry.get("us"), dict):
        return False
    picks = entry["picks"]
    return set(picks) == {str(b) for b in ROW_BUCKETS} and all(k in kernels for k in picks.values())


def time_us(fn: Callable[[], object], reps: int = 3, min_s: float = 0.002) -> float:
    """Best of `reps` timings of fn, each repeated until it took min_s (µs per call)."""
    fn()
    best = float("inf")
    for _ in range(reps):
        n, start = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_s:
                break
        best = min(best, elapsed / n)
    return best * 1e6
