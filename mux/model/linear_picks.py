"""Which kernel serves each CPU linear at each row bucket, and whether the weights are fp32 or bf16: measured on
this machine at first use, kept in the pick cache (mux/runtime/picks.py), reported in /admin/stats.

Per shape (in, out) and weight dtype, every kernel of mux/model/cpu.py that this process can run is checked against
torch's linear on the same weights (a kernel that fails is never picked, and counted), then timed at each row
bucket over the model's own linears of that shape: eight for a few rows (a decode step streams them from memory,
so a pass over one weight that stays in cache would flatter the fp32 kernels), two for more rows (arithmetic),
the kernels in turn, three rounds, each keeping its best. One kernel serves every bucket, and another only the
buckets where it is ≥ 15% faster (a second layout costs its memory; closer timings are noise).

`dtype="auto"` takes bf16 weights where they make the model's linears faster by ≥ 10% (geometric mean over the
buckets of the summed time of every linear): AMX or AVX512-BF16 CPUs; fp32 elsewhere. bf16 rounds the weights, so
it must earn its place.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mux import native
from mux.errors import MuxError
from mux.model.cpu import C_FORMATS, KERNELS, PackedLinear, available_kernels, linears, weight_format
from mux.runtime import picks as pick_cache
from mux.runtime.picks import ROW_BUCKETS, PickCache, machine_key, time_us

log = logging.getLogger(__name__)

FEW = 8  # buckets up to this many rows are timed over FEW_LINEARS linears of the shape (their weights > L2)
FEW_LINEARS = 8
MANY_LINEARS = 2  # linears timed at larger buckets
ROUNDS = 3  # each kernel's best of this many turns at each bucket
SECOND_LAYOUT_GAIN = 0.85  # another kernel serves a bucket where it takes ≤ 85% of the single best one's time
MEASURE = 2  # how the timings were taken, in the cache entries' names: another way measures again
BF16_GAIN = 0.9  # auto: bf16 weights where the model's linears take ≤ 90% of fp32's time
# self-check: max |Δ| relative to max |y| of the reference (int8 and int4 kernels compute in fp32 over the dequantized
# weights; bf16 ones round the weights, oneDNN's the activations too)
TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2, "int8": 1e-4, "int4": 1e-4}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(slots=True)
class LinearPlan:
    """The weight dtype and each shape's picks (bucket -> kernel), with the timings they came from. A shape is (in,
    out, format): the linears a quantization holds in int8 or int4 are picked among their format's kernels."""

    weight_dtype: str  # of the linears left unquantized: float32 | bfloat16
    picks: dict[tuple[int, int, str], dict[int, str]]
    us: dict[str, dict[tuple[int, int, str], dict[str, dict[int, float]]]] = field(default_factory=dict)
    measured_s: float = 0.0  # time spent measuring in this process (0: every pick came from the cache)
    self_check_failures: Counter = field(default_factory=Counter)  # kernel -> shapes it failed on
    bf16_ratio: float | None = None  # auto: the model's linears' time in bf16 over fp32

    def for_linear(self, linear: nn.Linear) -> dict[int, str]:
        return self.picks[_shape(linear)]

    def report(self) -> dict:
        """For /admin/stats and the start-up log: the dtype and, per shape, which kernel serves which buckets."""
        shapes = {}
        for (i, o, fmt), table in sorted(self.picks.items()):
            name = f"{i}x{o}" if fmt == "float" else f"{i}x{o}:{fmt}"
            shapes[name] = {k: [b for b in ROW_BUCKETS if table.get(b) == k] for k in sorted(set(table.values()))}
        return {
            "weight_dtype": self.weight_dtype,
            "linears": shapes,
            "measured_s": round(self.measured_s, 3),
            "self_check_failures": dict(self.self_check_failures),
            "bf16_vs_fp32_time": None if self.bf16_ratio is None else round(self.bf16_ratio, 3),
        }


def _shape(linear: nn.Module) -> tuple[int, int, str]:
    fmt = weight_format(linear)
    return linear.in_features, linear.out_features, "float" if fmt == "float32" else fmt


def plan(model: nn.Module, dtype: str = "auto", cache: PickCache | None = None) -> LinearPlan:
    """The picks for every nn.Linear of `model` (fp32 weights on the CPU, some quantized by mux/model/quant.py).
    dtype (of the unquantized ones): auto | float32 | bfloat16."""
    groups: dict[tuple[int, int, str], list[nn.Linear]] = {}
    for linear in linears(model).values():
        groups.setdefault(_shape(linear), []).append(linear)
    available = available_kernels()
    if (forced := pick_cache.forced("linear")) is not None:  # a kernel, or a table bucket -> kernel
        return _forced_plan(forced, groups, available)
    if dtype == "auto" and (forced_dtype := pick_cache.forced("weight_dtype")) is not None:
        dtype = forced_dtype
    wanted = ("float32", "bfloat16") if dtype == "auto" else (dtype,)
    candidates = {d: tuple(k for k in available if KERNELS[k] == d) for d in (*wanted, "int8", "int4")}
    if dtype == "bfloat16" and not candidates["bfloat16"]:
        raise MuxError("--dtype bfloat16 on this CPU needs oneDNN with bf16 or a C compiler for mux's kernels")
    cache = cache or PickCache(machine_key(native.source_digest() if native.library() else ""))
    start, measured = time.perf_counter(), False
    result = LinearPlan("float32", {})
    for shape, members in groups.items():
        for d in wanted if shape[2] == "float" else (shape[2],):
            if not candidates[d]:
                continue
            name = f"linear:m{MEASURE}:{d}:{shape[0]}x{shape[1]}"
            entry = cache.get(name, candidates[d])
            if entry is None:
                us, measured = _measure(members, candidates[d], result.self_check_failures), True
                entry = {"picks": _pick(us), "us": us}
                cache.put(name, entry["picks"], us)
            result.us.setdefault(d, {})[shape] = {k: {int(b): t for b, t in v.items()} for k, v in entry["us"].items()}
    floats = {s: ms for s, ms in groups.items() if s[2] == "float"}
    chosen = next(d for d in wanted if candidates[d])
    if len([d for d in wanted if candidates[d]]) == 2 and floats:
        result.bf16_ratio = _ratio(result.us["bfloat16"], result.us["float32"], floats)
        chosen = "bfloat16" if result.bf16_ratio <= BF16_GAIN else "float32"
    result.weight_dtype = chosen
    result.picks = {s: _prune(result.us[chosen if s[2] == "float" else s[2]][s]) for s in groups}
    result.measured_s = time.perf_counter() - start if measured else 0.0
    return result


def _forced_plan(forced, groups: dict, available: tuple[str, ...]) -> LinearPlan:
    """The plan `picks.force("linear", ...)` asks for: the forced table for the shapes of its kernels' format, and
    the first available kernel of their own format (a C one where the library is built) for the others."""
    table = dict.fromkeys(ROW_BUCKETS, forced) if isinstance(forced, str) else dict(forced)
    if set(table) != set(ROW_BUCKETS) or not set(table.values()) <= set(KERNELS):
        raise ValueError(f"forced linear picks {forced!r}: a kernel of {sorted(KERNELS)} for every bucket")
    fmt = KERNELS[table[ROW_BUCKETS[-1]]]
    picks = {}
    for shape in groups:
        own = shape[2] if shape[2] != "float" else ("float32" if fmt in ("int8", "int4") else fmt)
        if own == fmt:
            picks[shape] = dict(table)
        else:
            kernel = next(k for k in sorted(available, key=lambda k: k not in C_FORMATS) if KERNELS[k] == own)
            picks[shape] = dict.fromkeys(ROW_BUCKETS, kernel)
    return LinearPlan("bfloat16" if fmt == "bfloat16" else "float32", picks)


def _measure(members: list[nn.Linear], kernels: tuple[str, ...], failures: Counter) -> dict[str, dict[int, float]]:
    """kernel -> bucket -> µs per linear, for the kernels that pass the self-check on this shape. The kernels are
    timed in turn, ROUNDS times at each bucket, and each keeps its best: a busy moment of the machine hits every
    kernel alike instead of the one being timed then."""
    gen = torch.Generator().manual_seed(0)
    weight = members[0].weight.detach()
    packed: dict[str, list[PackedLinear]] = {}
    for kernel in kernels:
        try:  # a kernel may refuse a shape (torch's int4: output features a multiple of 16)
            packed[kernel] = [PackedLinear(m, kernel) for m in members[:FEW_LINEARS]]
        except RuntimeError:
            packed[kernel] = []
        if not packed[kernel] or not _self_check(packed[kernel][0], weight, members[0].bias, gen):
            failures[kernel] += 1
            log.warning("linear kernel %s failed its self-check on %s; not picked", kernel, tuple(weight.shape[::-1]))
            del packed[kernel]
    if not packed:
        raise MuxError(f"no CPU linear kernel passed its self-check for shape {tuple(weight.shape[::-1])}")
    us: dict[str, dict[int, float]] = {k: dict.fromkeys(ROW_BUCKETS, math.inf) for k in packed}
    for b in ROW_BUCKETS:
        x = torch.randn(b, weight.shape[1], generator=gen)
        for _ in range(ROUNDS):
            for kernel, ms in packed.items():
                timed = ms if b <= FEW else ms[:MANY_LINEARS]
                t = time_us(lambda ms=timed, x=x: [m(x) for m in ms], reps=1, min_s=0.0005) / len(timed)
                us[kernel][b] = min(us[kernel][b], t)
    return us


def _self_check(packed: PackedLinear, weight: torch.Tensor, bias, gen: torch.Generator) -> bool:
    """The kernel's output against torch's linear over the same (dtype-rounded) weights, at a few row counts."""
    w = weight.to(torch.bfloat16).float() if packed.weight_format == "bfloat16" else weight  # int: dequantized
    for rows in (1, 5, 67):
        x = torch.randn(rows, weight.shape[1], generator=gen)
        want = F.linear(x, w, None if bias is None else bias.detach().float())
        try:
            got = packed(x)
        except RuntimeError:
            return False
        scale = want.abs().max().item() or 1.0
        if got.shape != want.shape or not (got - want).abs().max().item() <= TOLERANCE[packed.weight_format] * scale:
            return False
    return True


def _pick(us: dict[str, dict[int, float]]) -> dict[int, str]:
    return {b: min(us, key=lambda k: us[k][b]) for b in ROW_BUCKETS}


def _prune(us: dict[str, dict[int, float]]) -> dict[int, str]:
    """One kernel for every bucket (the one that is nowhere far from the fastest), and another only at the buckets
    where it takes ≤ 85% of that one's time: a second layout costs its memory, and closer timings are noise."""
    picks = _pick(us)
    best = {b: us[picks[b]][b] for b in ROW_BUCKETS}
    single = min(us, key=lambda k: max(us[k][b] / best[b] for b in ROW_BUCKETS))
    return {b: picks[b] if best[b] <= SECOND_LAYOUT_GAIN * us[single][b] else single for b in ROW_BUCKETS}


def _ratio(bf16: dict, fp32: dict, groups: dict[tuple[int, int], list]) -> float:
    """Geometric mean over the buckets of (every linear's best bf16 time) / (its best fp32 time)."""
    logs = []
    for b in ROW_BUCKETS:
        total = {name: sum(len(groups[s]) * min(t[b] for t in us[s].values()) for s in groups)
                 for name, us in (("bf16", bf16), ("fp32", fp32))}  # fmt: skip
        logs.append(math.log(total["bf16"] / total["fp32"]))
    return math.exp(sum(logs) / len(logs))
