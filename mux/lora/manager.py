"""Adapter memory manager: device slots ↔ host RAM ↔ disk, eviction by policy, pins, async loading, stats.

- Device tier: the fixed pool of `max_loras` slots inside the MultiLoRA layers. An adapter a sequence uses
  (running, or waiting with its slot reserved) is pinned and never evicted or overwritten.
- Host tier: validated adapter tensors in RAM (pinned on CUDA, copied on a side stream), bounded in bytes
  and count (a cachetools cache whose `popitem` asks the policy for the victim). Evicting from the device
  keeps (or puts back) a host copy.
- Disk tier: the adapter directories, read lazily with safetensors and validated on every read.

The engine thread calls `acquire`/`is_ready`/`release`; the loader thread copies disk→host→device while
the engine keeps stepping (a host-tier hit is copied at once by `acquire`); request threads call `prepare`
to validate an adapter, reading it into the host tier, before queueing.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path

import cachetools
import torch

from mux.config import LoRAConfig
from mux.errors import AdapterNotFound, InvalidAdapter
from mux.lora.adapter import LoRAWeights, adapter_key, load_adapter
from mux.lora.layers import MultiLoRAModel
from mux.lora.policies import EvictionPolicy, make_policy
from mux.runtime.cpu import serial_torch_here

LOADING, READY = "loading", "ready"


@dataclass(frozen=True, slots=True)
class AdapterRef:
    """What a request carries: which exact weights, not the weights themselves."""

    key: str
    path: Path
    rank: int
    nbytes: int


@dataclass(slots=True)
class DeviceEntry:
    slot: int
    ref: AdapterRef
    state: str = LOADING
    refs: int = 0  # pins: sequences that hold this slot (+1 while permanently pinned)
    modules: dict[str, int] = field(default_factory=dict)  # module -> rank, to copy the slot back to host
    load_s: float | None = None  # from the start of its load (disk read or host copy) to ready


@dataclass(slots=True)
class Usage:
    path: Path
    uses: int = 0
    last_used: float = 0.0


class HostCache(cachetools.Cache):
    """Size-aware host tier: maxsize in bytes, plus a count limit; the policy picks each victim."""

    def __init__(self, max_bytes: int, max_count: int, policy: EvictionPolicy, on_evict) -> None:
        super().__init__(maxsize=max_bytes, getsizeof=lambda w: w.nbytes)
        self.max_count = max_count
        self.policy = policy
        self.on_evict = on_evict

    def __getitem__(self, key: str) -> LoRAWeights:
        value = super().__getitem__(key)
        self.policy.record_use(key, value.nbytes)
        return value

    def __setitem__(self, key: str, value: LoRAWeights) -> None:
        while key not in self and len(self) >= self.max_count:
            self.popitem()
        super().__setitem__(key, value)
        self.policy.record_use(key, value.nbytes)

    def offer(self, key: str, value: LoRAWeights) -> None:
        """Insert unless the adapter is larger than the whole tier (then it lives on disk only)."""
        if value.nbytes <= self.maxsize:
            self[key] = value

    def popitem(self):
        key = self.policy.victim(iter(self))
        if key is None:
            raise KeyError("host cache is empty")
        value = cachetools.Cache.__getitem__(self, key)  # not self[key]: looking is not using
        cachetools.Cache.__delitem__(self, key)
        self.on_evict(key)
        return key, value


class AdapterManager:
    def __init__(self, lora: MultiLoRAModel, config: LoRAConfig) -> None:
        self.lora = lora
        self.config = config
        self.device_policy = make_policy(config.eviction_policy, "device")
        self.host = HostCache(
            config.max_cpu_adapter_bytes,
            config.max_cpu_loras,
            make_policy(config.eviction_policy, "host"),
            self._host_evicted,
        )
        self.entries: dict[str, DeviceEntry] = {}
        self.free_slots = list(range(config.max_loras - 1, -1, -1))
        self.permanent: set[str] = set()
        self.failures: dict[str, str] = {}  # key -> why its load failed (engine fails the waiting sequences)
        self.queued: Counter[str] = Counter()  # key -> live sequences of it, slot or not (submit to finish)
        self.retired: set[Path] = set()  # directories being deleted: no new sequence may hold what lies there
        self.usage: dict[str, Usage] = {}
        self.counters = {
            "hits": {"device": 0, "host": 0},
            "misses": 0,
            "loads": {"disk_to_host": 0, "host_to_device": 0},
            "evictions": {"device_to_host": 0, "host_to_disk": 0},
        }
        self.latency: dict[str, deque[float]] = {p: deque(maxlen=2048) for p in ("disk_to_host", "host_to_device")}
        self._lock = threading.RLock()
        self._loaded = threading.Condition(self._lock)
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._loader: threading.Thread | None = None
        self._stream = torch.cuda.Stream(lora.device) if lora.device.type == "cuda" else None
        if config.async_loading:
            self._loader = threading.Thread(target=self._load_loop, name="mux-adapter-loader", daemon=True)
            self._loader.start()

    # ---- request threads --------------------------------------------------------------------
    def cached(self, path: str | Path) -> AdapterRef | None:
        """The ref of the weights now at `path` if the host tier holds them (no read), else None."""
        path = Path(path)
        key = adapter_key(path)
        with self._lock:
            weights = self.host.get(key) if key else None
        return None if weights is None else AdapterRef(weights.key, path, weights.rank, weights.nbytes)

    def prepare(self, path: str | Path) -> AdapterRef:
        """Validate the adapter at `path` (reading it into the host tier unless it is already there)."""
        serial_torch_here()  # a request thread: never a second OpenMP team beside the engine's
        path = Path(path)
        if (ref := self.cached(path)) is not None:
            return ref
        weights = self._read_disk(path)
        return AdapterRef(weights.key, path, weights.rank, weights.nbytes)

    # ---- engine thread ----------------------------------------------------------------------
    def acquire(self, ref: AdapterRef) -> int | None:
        """Pin `ref` into a device slot, starting its load if needed. None: every slot is pinned, try later."""
        with self._lock:
            entry = self.entries.get(ref.key)
            if entry is None:
                slot = self._free_slot()
                if slot is None:
                    return None
                entry = self.entries[ref.key] = DeviceEntry(slot, ref)
                self._start_load(entry)
            elif entry.state == READY:
                self.counters["hits"]["device"] += 1
            entry.refs += 1
            if ref.key not in self.usage:
                self.usage[ref.key] = Usage(ref.path)
                self._prune_bookkeeping()
            u = self.usage[ref.key]
            u.uses += 1
            u.last_used = time.time()
            self.device_policy.record_use(ref.key, ref.nbytes)
            return entry.slot

    def is_ready(self, key: str) -> bool:
        entry = self.entries.get(key)
        return entry is not None and entry.state == READY

    def release(self, key: str) -> None:
        with self._lock:
            entry = self.entries.get(key)
            if entry is not None and entry.refs > 0:
                entry.refs -= 1

    def wait_for_load(self, timeout: float) -> bool:
        """Wait up to `timeout` for a load in progress to finish; False when nothing is loading."""
        with self._loaded:
            if not any(e.state == LOADING for e in self.entries.values()):
                return False
            self._loaded.wait(timeout)
            return True

    @property
    def num_pinned(self) -> int:
        return sum(1 for e in self.entries.values() if e.refs)

    def resident(self) -> dict[str, int]:
        """key -> slot of every adapter in a device slot (loaded or loading)."""
        return {k: e.slot for k, e in self.entries.items()}

    # ---- operator actions -------------------------------------------------------------------
    def pin(self, path: str | Path) -> AdapterRef:
        """Keep an adapter in a device slot until unpinned (policy file or admin call)."""
        ref = self.prepare(path)
        with self._lock:
            self._refuse_retired(ref.key)
            if ref.key in self.permanent:
                return ref
            if self.acquire(ref) is None:
                raise InvalidAdapter("every device slot is pinned; unpin another adapter first")
            self.permanent.add(ref.key)
        return ref

    def unpin(self, key: str) -> bool:
        with self._lock:
            if key not in self.permanent:
                return False
            self.permanent.discard(key)
            self.release(key)
            return True

    def evict(self, key: str) -> bool:
        """Move an unpinned adapter out of its device slot (to the host tier). False if it is pinned or absent."""
        with self._lock:
            entry = self.entries.get(key)
            if entry is None or entry.refs or entry.state != READY:
                return False
            self._evict_device(key)
            self.free_slots.append(entry.slot)
            return True

    def forget(self, path: Path) -> None:
        """Drop every unpinned copy of the adapters stored at or below `path` (deleted or replaced on disk)."""
        with self._lock:
            self.retired.discard(Path(path))
            for key in [k for k in self.host if _under(k, path)]:
                del self.host[key]
            for key in [k for k, e in self.entries.items() if _under(k, path) and not e.refs]:
                self.free_slots.append(self.entries.pop(key).slot)

    def hold(self, key: str) -> None:
        """A sequence of this adapter was submitted: `in_use` says so until `unhold`, slot or not yet.
        Raises AdapterNotFound for an adapter being deleted (see `retire`)."""
        with self._lock:
            self._refuse_retired(key)
            self.queued[key] += 1

    def unhold(self, key: str) -> None:
        with self._lock:
            self.queued[key] -= 1
            if self.queued[key] <= 0:
                del self.queued[key]

    def in_use(self, path: Path) -> bool:
        """Does a request (queued or running: every one holds its adapter) or an operator pin hold an adapter
        stored at or below `path`? (Slot refs need no look of their own: each comes from one or the other.)"""
        with self._lock:
            return any(_under(k, path) for k in (*self.queued, *self.permanent))

    def in_flight(self, path: Path) -> int:
        """Requests queued or running on the adapter stored at `path` (that directory itself, not below it)."""
        where = str(Path(path).resolve())
        with self._lock:
            return sum(n for k, n in self.queued.items() if k.rsplit("#", 1)[0] == where)

    def retire(self, path: Path) -> bool:
        """Before deleting `path`: False if it is in use; else no request can hold it from now until `forget`
        (the check and the mark are one step, so a request prepared just before cannot slip in after it)."""
        with self._lock:
            if self.in_use(path):
                return False
            self.retired.add(Path(path))
            return True

    # ---- internals --------------------------------------------------------------------------
    def _refuse_retired(self, key: str) -> None:
        if self.retired and any(_under(key, path) for path in self.retired):
            raise AdapterNotFound("the adapter was deleted")

    def _free_slot(self) -> int | None:
        if self.free_slots:
            return self.free_slots.pop()
        idle = [k for k, e in self.entries.items() if e.refs == 0 and e.state == READY]
        victim = self.device_policy.victim(idle)
        if victim is None:
            return None
        return self._evict_device(victim)

    def _evict_device(self, key: str) -> int:
        entry = self.entries.pop(key)
        if key not in self.host:  # the host copy was dropped meanwhile: copy the slot back
            self.host.offer(key, self._read_slot(entry))
        self.counters["evictions"]["device_to_host"] += 1
        return entry.slot

    def _read_slot(self, entry: DeviceEntry) -> LoRAWeights:
        layout, at = [], 0
        for name, r in sorted(entry.modules.items()):
            layer = self.lora.layers[name]
            i, o = layer.in_features, layer.out_features
            layout.append((name, r, i, o, at, at + r * i))
            at += r * (i + o)
        buffer = torch.empty(at, dtype=self.lora.dtype, pin_memory=self._stream is not None)
        for name, r, i, o, a, b in layout:
            layer = self.lora.layers[name]
            buffer[a : a + r * i].view(r, i).copy_(layer.lora_a[entry.slot, :r])
            buffer[b : b + r * o].view(r, o).copy_(layer.lora_b[entry.slot, :r])
        targets = tuple(sorted({m.rsplit(".", 1)[-1] for m in entry.modules}))
        ref = entry.ref
        return LoRAWeights(ref.path, ref.key, ref.rank, targets, buffer, tuple(layout))

    def _host_evicted(self, key: str) -> None:
        self.counters["evictions"]["host_to_disk"] += 1
        self._prune_bookkeeping()

    def _prune_bookkeeping(self) -> None:
        """Per-key statistics of adapters in no tier (old versions, cold adapters) are bounded: past twice the
        tiers' capacity in keys, the least recently used disk-only keys are forgotten, down to three quarters
        of that, so the sort runs once per many new keys rather than on every one (acquire is on the step)."""
        limit = 2 * (self.config.max_cpu_loras + self.config.max_loras)
        if len(self.usage) <= limit:
            return
        idle = sorted((u.last_used, k) for k, u in self.usage.items() if k not in self.entries and k not in self.host)
        for _, key in idle[: len(self.usage) - limit * 3 // 4]:
            del self.usage[key]
            self.device_policy.forget(key)
            self.host.policy.forget(key)

    def _start_load(self, entry: DeviceEntry) -> None:
        """A host-tier hit up to `inline_load_bytes` is copied into its slot at once, on the calling thread (the
        engine's; an operator's pin): the copy (≈2 ms for a SmolLM2 rank-8 adapter on CPU, queued in stream
        order on CUDA) costs far less than the step a request would otherwise wait for the loader, and every
        request of a cold tail adapter pays that step while holding its slot (`python -m bench.adapter_scaling
        --compare-inline`). Disk reads and larger adapters go to the loader thread."""
        inline = entry.ref.nbytes <= self.config.inline_load_bytes and entry.ref.key in self.host
        if self._loader is None or inline:
            self._load(entry, inline=True)
        else:
            self._jobs.put(entry)

    def _load_loop(self) -> None:
        serial_torch_here()
        while True:
            self._load(self._jobs.get())

    def _load(self, entry: DeviceEntry, inline: bool = False) -> None:
        key, start = entry.ref.key, time.perf_counter()
        try:
            with self._lock:
                weights = self.host.get(key)
                if weights is not None:
                    self.counters["hits"]["host"] += 1
            if weights is None:
                weights = self._read_disk(entry.ref.path)
                if weights.key != key:
                    raise InvalidAdapter(f"adapter {entry.ref.path} changed on disk while queued")
            t = time.perf_counter()
            self._copy_to_slot(entry.slot, weights, inline)
            self.latency["host_to_device"].append(time.perf_counter() - t)
            with self._lock:
                self.counters["loads"]["host_to_device"] += 1
                entry.modules = {name: r for name, r, *_ in weights.layout}
                entry.state = READY
                entry.load_s = time.perf_counter() - start
                self._loaded.notify_all()
        except Exception as e:  # the waiting sequences fail with this message; the slot is freed
            with self._lock:
                self.failures[key] = f"adapter load failed: {e}"
                if self.entries.get(key) is entry:
                    del self.entries[key]
                    self.free_slots.append(entry.slot)
                self._loaded.notify_all()

    def _copy_to_slot(self, slot: int, weights: LoRAWeights, inline: bool) -> None:
        if self._stream is None or inline:  # inline: the engine's own stream orders it before the next step
            self.lora.load(slot, weights)
            return
        with torch.cuda.stream(self._stream):  # overlaps the engine's forward on the default stream
            self.lora.load(slot, weights)
        self._stream.synchronize()

    def _read_disk(self, path: Path) -> LoRAWeights:
        t = time.perf_counter()
        pin = self._stream is not None  # pinned host memory: asynchronous host→device copies
        weights = load_adapter(path, self.lora.shapes, self.config.max_lora_rank, self.lora.dtype, pin_memory=pin)
        elapsed = time.perf_counter() - t
        with self._lock:
            self.counters["misses"] += 1
            self.counters["loads"]["disk_to_host"] += 1
            self.latency["disk_to_host"].append(elapsed)
            self.host.offer(weights.key, weights)
        return weights

    # ---- stats ------------------------------------------------------------------------------
    def stats(self) -> dict:
        with self._lock:
            return {
                "tiers": {
                    "device": {
                        "capacity": self.config.max_loras,
                        "used": len(self.entries),
                        "pinned": sum(1 for e in self.entries.values() if e.refs),
                        "bytes_per_slot": self.lora.nbytes_per_slot,
                    },
                    "host": {
                        "capacity_bytes": self.host.maxsize,
                        "used_bytes": self.host.currsize,
                        "capacity_count": self.host.max_count,
                        "count": len(self.host),
                    },
                },
                "counters": {k: dict(v) if isinstance(v, dict) else v for k, v in self.counters.items()},
                "load_latency_s": {p: _percentiles(v) for p, v in self.latency.items()},
                "adapters": [self._describe(k, u) for k, u in self.usage.items()],
            }

    def _describe(self, key: str, u: Usage) -> dict:
        entry = self.entries.get(key)
        tier = (
            "device"
            if entry and entry.state == READY
            else "loading"
            if entry
            else ("host" if key in self.host else "disk")
        )
        return {
            "key": key,
            "path": str(u.path),
            "tier": tier,
            "slot": entry.slot if entry else None,
            "load_s": entry.load_s if entry else None,
            "pinned": key in self.permanent,
            "in_flight": (entry.refs - (key in self.permanent)) if entry else 0,
            "uses": u.uses,
            "last_used": u.last_used,
        }


def _percentiles(values) -> dict:
    if not values:
        return {"count": 0, "p50": None, "p95": None, "max": None}
    s = sorted(values)
    return {"count": len(s), "p50": s[len(s) // 2], "p95": s[min(len(s) - 1, int(len(s) * 0.95))], "max": s[-1]}


def _under(key: str, path: Path) -> bool:
    """Keys are "<resolved dir>#<stamp>": is that directory `path` or inside it?"""
    where = Path(path).resolve()
    adapter_dir = key.rsplit("#", 1)[0]
    return adapter_dir == str(where) or adapter_dir.startswith(f"{where}/")
