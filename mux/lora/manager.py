"""Adapter memory manager: device slots ↔ host RAM ↔ disk, eviction by policy, pins, async loading, stats.

- Device tier: the page pool inside the MultiLoRA layers, bounded in bytes (`max_lora_bytes`): an adapter takes
  the pages its own rank needs and a slot (its row of the page table). An adapter a sequence uses (running, or
  waiting with its pages reserved) is pinned and never evicted or overwritten; at most `max_loras` are pinned
  at once, so one step never carries more distinct adapters. Eviction frees pages until the new adapter fits;
  pages are all one size, so any adapter that fits the free bytes loads (no fragmentation).
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
from mux.lora.layers import MultiLoRAModel, pages_for
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
    pages: tuple[int, ...]
    ref: AdapterRef
    state: str = LOADING
    refs: int = 0  # pins: sequences that hold this adapter (+1 while permanently pinned)
    modules: dict[str, int] = field(default_factory=dict)  # module -> rank, to copy the pages back to host
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
        self.free_slots = list(range(lora.num_pages - 1, -1, -1))  # rows of the page table
        self.free_pages = list(range(lora.num_pages - 1, -1, -1))
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
        if (ref := self.cached(path)) is None:
            weights = self._read_disk(path)
            ref = AdapterRef(weights.key, path, weights.rank, weights.nbytes)
        if pages_for(ref.rank) > self.lora.num_pages:
            need, pool = pages_for(ref.rank) * self.lora.page_bytes, self.lora.num_pages * self.lora.page_bytes
            raise InvalidAdapter(f"rank {ref.rank} needs {need} bytes of device memory; max_lora_bytes holds {pool}")
        return ref

    # ---- engine thread ----------------------------------------------------------------------
    def acquire(self, ref: AdapterRef) -> int | None:
        """Pin `ref` into device pages, starting its load if needed; -> its slot. None: max_loras adapters are
        pinned, or the unpinned ones do not free enough pages: try later."""
        with self._lock:
            entry = self.entries.get(ref.key)
            if (entry is None or not entry.refs) and self.num_pinned >= self.config.max_loras:
                return None
            if entry is None:
                pages = self._free_pages(pages_for(ref.rank))
                if pages is None:
                    return None
                entry = self.entries[ref.key] = DeviceEntry(self.free_slots.pop(), pages, ref)
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
        """key -> slot of every adapter on the device (loaded or loading)."""
        return {k: e.slot for k, e in self.entries.items()}

    # ---- operator actions -------------------------------------------------------------------
    def pin(self, path: str | Path) -> AdapterRef:
        """Keep an adapter on the device until unpinned (policy file or admin call)."""
        ref = self.prepare(path)
        with self._lock:
            self._refuse_retired(ref.key)
            if ref.key in self.permanent:
                return ref
            if self.acquire(ref) is None:
                raise InvalidAdapter("the device pool is pinned full; unpin another adapter first")
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
        """Move an unpinned adapter off the device (to the host tier). False if it is pinned or absent."""
        with self._lock:
            entry = self.entries.get(key)
            if entry is None or entry.refs or entry.state != READY:
                return False
            self._evict_device(key)
            return True

    def forget(self, path: Path) -> None:
        """Drop every unpinned copy of the adapters stored at or below `path` (deleted or replaced on disk)."""
        with self._lock:
            self.retired.discard(Path(path))
            for key in [k for k in self.host if _under(k, path)]:
                del self.host[key]
            for key in [k for k, e in self.entries.items() if _under(k, path) and not e.refs]:
                self._free(self.entries.pop(key))

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

    def _free_pages(self, need: int) -> tuple[int, ...] | None:
        """`need` pages, evicting unpinned adapters (the policy's victims) until they are free; None (nothing
        evicted) when even evicting every unpinned adapter would not free them."""
        idle = {k: len(e.pages) for k, e in self.entries.items() if e.refs == 0 and e.state == READY}
        if len(self.free_pages) + sum(idle.values()) < need:
            return None
        while len(self.free_pages) < need:
            victim = self.device_policy.victim(idle)
            del idle[victim]
            self._evict_device(victim)
        return tuple(self.free_pages.pop() for _ in range(need))

    def _free(self, entry: DeviceEntry) -> None:
        self.free_pages.extend(entry.pages)
        self.free_slots.append(entry.slot)

    def _evict_device(self, key: str) -> None:
        entry = self.entries.pop(key)
        if key not in self.host:  # the host copy was dropped meanwhile: copy the pages back
            self.host.offer(key, self._read_slot(entry))
        self._free(entry)
        self.counters["evictions"]["device_to_host"] += 1

    def _read_slot(self, entry: DeviceEntry) -> LoRAWeights:
        layout, at = [], 0
        for name, r in sorted(entry.modules.items()):
            layer = self.lora.layers[name]
            i, o = layer.in_features, layer.out_features
            layout.append((name, r, i, o, at, at + r * i))
            at += r * (i + o)
        buffer = torch.empty(at, dtype=self.lora.dtype, pin_memory=self._stream is not None)
        for name, r, i, o, a, b in layout:
            layer, rows = self.lora.layers[name], self.lora.rows(entry.slot, r)
            buffer[a : a + r * i].view(r, i).copy_(layer.lora_a[rows])
            buffer[b : b + r * o].view(r, o).copy_(layer.lora_b[rows])
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
            self._copy_to_device(entry, weights, inline)
            self.latency["host_to_device"].append(time.perf_counter() - t)
            with self._lock:
                self.counters["loads"]["host_to_device"] += 1
                entry.modules = {name: r for name, r, *_ in weights.layout}
                entry.state = READY
                entry.load_s = time.perf_counter() - start
                self._loaded.notify_all()
        except Exception as e:  # the waiting sequences fail with this message; the pages are freed
            with self._lock:
                self.failures[key] = f"adapter load failed: {e}"
                if self.entries.get(key) is entry:
                    del self.entries[key]
                    self._free(entry)
                self._loaded.notify_all()

    def _copy_to_device(self, entry: DeviceEntry, weights: LoRAWeights, inline: bool) -> None:
        if self._stream is None or inline:  # inline: the engine's own stream orders it before the next step
            self.lora.load(entry.slot, entry.pages, weights)
            return
        with torch.cuda.stream(self._stream):  # overlaps the engine's forward on the default stream
            self.lora.load(entry.slot, entry.pages, weights)
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
                        "capacity_bytes": self.lora.num_pages * self.lora.page_bytes,
                        "used_bytes": (self.lora.num_pages - len(self.free_pages)) * self.lora.page_bytes,
                        "free_bytes": len(self.free_pages) * self.lora.page_bytes,
                        "page_bytes": self.lora.page_bytes,
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
            "rank": entry.ref.rank if entry else None,
            "device_bytes": len(entry.pages) * self.lora.page_bytes if entry else 0,
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
