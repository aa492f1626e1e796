"""Reading and validating a PEFT LoRA adapter directory into per-module (A, B·scale) host tensors.

Everything is checked before any slot is touched; pickle weights are never unpickled.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from cachetools import LRUCache

from mux import jsonread
from mux.errors import InvalidAdapter

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MAX_CONFIG_BYTES = 1 << 20
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit on a file's JSON header
KEEP_READ_BUFFER_BYTES = 64 << 20  # a thread keeps its read buffer for the next file up to this size
PLAN_CACHE_SIZE = 64  # distinct weights-file headers whose checked conversion plan is kept (see _plan)
PICKLE_REFUSED = "pickle weights (adapter_model.bin) are never loaded; provide adapter_model.safetensors"
# PEFT keys: base_model.model.<module path>.lora_A.weight (older saves keep the adapter name: .lora_A.default.weight)
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
_UNSUPPORTED_FLAGS = {  # config key -> why it is refused when truthy
    "use_dora": "DoRA adapters (use_dora=true) are not supported",
    "modules_to_save": "modules_to_save (fully trained extra modules) is not supported",
    "lora_bias": "LoRA bias (lora_bias=true) is not supported",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D-style weights) is not supported",
    "layer_replication": "layer_replication is not supported",
    "target_parameters": "target_parameters (LoRA on raw parameters) is not supported",
    "use_qalora": "QA-LoRA (use_qalora=true) is not supported",
    "trainable_token_indices": "trainable_token_indices is not supported",
}
_EMBEDDING_NAMES = ("embed_tokens", "lm_head", "wte", "embed_out", "word_embeddings")
# safetensors dtypes -> bytes per element; the floating ones LoRA weights may have -> (numpy storage, torch dtype)
_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2,
             "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}  # fmt: skip
_FLOATS = {
    "F16": (np.dtype("<u2"), torch.float16),
    "BF16": (np.dtype("<u2"), torch.bfloat16),  # numpy has no bfloat16: the bits travel as uint16
    "F32": (np.dtype("<f4"), torch.float32),
    "F64": (np.dtype("<f8"), torch.float64),
}


_read_buffer = threading.local()  # .buf: this thread's read buffer (see _read_file)
_plans: LRUCache = LRUCache(PLAN_CACHE_SIZE)  # (header, file size, max rank, id(shapes)) -> (shapes, groups)
_plans_lock = threading.Lock()


@dataclass(frozen=True, slots=True)
class _Tensor:
    """One tensor of the weights file: its safetensors dtype, shape and where its bytes start in the file."""

    dtype: str
    shape: tuple[int, ...]
    begin: int


@dataclass(frozen=True, slots=True)
class ModuleShape:
    in_features: int
    out_features: int


@dataclass(frozen=True, slots=True)
class LoRAWeights:
    """A validated adapter on the host: each module's A [r, in] and B·scale [r, out], contiguous, in one buffer.

    One tensor and a layout of plain tuples (which the cyclic collector stops tracking), not two tensors a module:
    a host tier of 1,000 SmolLM2 adapters held ~630,000 tracked objects, and one full collection walking them
    took 220 ms with the GIL held (ad hoc, this VM).
    """

    path: Path
    key: str  # identity of these exact weights: path + file stamp (a rewrite is a new key)
    rank: int  # the largest module rank
    target_modules: tuple[str, ...]  # short names, sorted: ("k_proj", "q_proj", ...)
    buffer: torch.Tensor  # [numel]: every A and B·s of the layout, gapless
    layout: tuple[tuple[str, int, int, int, int, int], ...]  # (module, r, in, out, A offset, B offset), by module

    @property
    def nbytes(self) -> int:
        return self.buffer.nbytes

    @property
    def modules(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """module path -> (A [r, in], B·s [r, out]): views of the buffer, made on each call (not the hot path)."""
        buf = self.buffer
        return {m: (buf[a : a + r * i].view(r, i), buf[b : b + r * o].view(r, o)) for m, r, i, o, a, b in self.layout}


def read_config(path: Path) -> dict:
    cfg_file = path / CONFIG_FILE
    if not path.is_dir():
        raise InvalidAdapter(f"adapter directory {path} does not exist")
    if not cfg_file.is_file():
        raise InvalidAdapter(f"missing {CONFIG_FILE} in {path.name}")
    if cfg_file.stat().st_size > MAX_CONFIG_BYTES:
        raise InvalidAdapter(f"{CONFIG_FILE} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        config = jsonread.loads(cfg_file.read_bytes(), CONFIG_FILE, MAX_CONFIG_BYTES)
    except jsonread.BadJSON as e:
        raise InvalidAdapter(str(e)) from None
    if not isinstance(config, dict):
        raise InvalidAdapter(f"{CONFIG_FILE} must hold a JSON object")
    check_config(config)
    return config


def check_config(config: dict) -> None:
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise InvalidAdapter(f"peft_type {peft_type} is not supported (only LORA)")
    for key, why in _UNSUPPORTED_FLAGS.items():
        if config.get(key):
            raise InvalidAdapter(why)
    if config.get("bias", "none") != "none":
        raise InvalidAdapter(f"bias={config['bias']!r} is not supported (only 'none')")
    targets = config.get("target_modules")
    if isinstance(targets, list) and (bad := [t for t in targets if t in _EMBEDDING_NAMES]):
        raise InvalidAdapter(f"embedding/lm_head targets are not supported: {', '.join(bad)}")
    for key in ("target_modules", "exclude_modules", "layers_pattern"):
        _check_names(config, key)
    layers = config.get("layers_to_transform")
    if not (layers is None or _is_int(layers) or (isinstance(layers, list) and all(map(_is_int, layers)))):
        raise InvalidAdapter(f"layers_to_transform must be a layer index or a list of them, got {layers!r:.80}")
    for key in ("r", "lora_alpha"):
        value = config.get(key, 8)
        if not _positive_number(value):
            raise InvalidAdapter(f"{key} must be a positive number, got {value!r:.80}")
    for key in ("rank_pattern", "alpha_pattern"):
        patterns = config.get(key) or {}
        if not isinstance(patterns, dict):
            raise InvalidAdapter(f"{key} must be an object")
        for pattern, value in patterns.items():
            try:
                re.compile(pattern)
            except re.error as e:
                raise InvalidAdapter(f"{key}: {pattern!r} is not a valid module pattern ({e})") from None
            if not _positive_number(value):
                raise InvalidAdapter(f"{key}[{pattern!r:.80}] must be a positive number, got {value!r:.80}")


def _check_names(config: dict, key: str) -> None:
    """`key` is absent, a regex (a string) or a list of module names."""
    value = config.get(key)
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as e:
            raise InvalidAdapter(f"{key}: {value!r:.80} is not a valid module pattern ({e})") from None
    elif not (value is None or (isinstance(value, list) and all(isinstance(v, str) for v in value))):
        raise InvalidAdapter(f"{key} must be a module pattern or a list of module names, got {value!r:.80}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_number(value) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value) and value > 0
    except OverflowError:  # an integer of hundreds of digits: no float holds it
        return False


def _pattern_value(patterns: dict, module: str, default: float) -> float:
    # PEFT's get_pattern_key: a pattern matches a module name's dotted suffix.
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def load_adapter(
    path: Path,
    shapes: dict[str, ModuleShape],
    max_rank: int,
    dtype: torch.dtype = torch.float32,
    pin_memory: bool = False,
) -> LoRAWeights:
    """Read and validate the adapter at `path` against the base model's targetable modules.

    The result's tensors are views of one new buffer (page-locked with pin_memory, for asynchronous copies to CUDA).
    """
    path = Path(path)
    config = read_config(path)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        if (path / "adapter_model.bin").exists():
            raise InvalidAdapter(PICKLE_REFUSED)
        raise InvalidAdapter(f"missing {WEIGHTS_FILE} in {path.name}")
    try:
        data = _read_file(weights)  # the file's bytes in this thread's read buffer, until its next read
    except OSError as e:
        raise InvalidAdapter(f"{WEIGHTS_FILE} could not be read: {e}") from None
    groups = _plan(data, shapes, max_rank, config)

    use_rslora = bool(config.get("use_rslora", False))
    alpha = float(config.get("lora_alpha", 8))
    alpha_pattern = config.get("alpha_pattern") or {}
    # The modules of one kind (q_proj, ...) are converted together, from a view of the file's bytes straight into
    # the adapter's one buffer: a 30-layer model has 210 pairs and per-tensor torch ops (≈7 µs each) were most of a
    # load. B is scaled while it is promoted and transposed (one pass, in ≥ fp32); finiteness is one sum, not a mask.
    # A SmolLM2 rank-8 fp16 read on the engine's torch thread: 10.5-10.8 ms with one copy per group stacked first,
    # 9.5 with this (/tmp ad hoc A/B, interleaved, 256 reads each).
    numel = sum(len(g.names) * g.r * (g.in_features + g.out_features) for g in groups)
    flat = torch.empty(numel, dtype=dtype, pin_memory=pin_memory)
    layout = []
    at = 0
    for g in groups:
        n, r, in_f, out = len(g.names), g.r, g.in_features, g.out_features
        a = flat[at : at + n * r * in_f].view(n, r, in_f)
        b = flat[at + n * r * in_f : at + n * r * (in_f + out)].view(n, r, out)
        layout += [(m, r, in_f, out, at + j * r * in_f, at + n * r * in_f + j * r * out) for j, m in enumerate(g.names)]
        at += n * r * (in_f + out)
        scales = [_scale(module, r, alpha, alpha_pattern, use_rslora) for module in g.names]
        a.copy_(_group(data, g.a))  # [n, r, in]
        b_file = _group(data, g.b)  # [n, out, r]
        torch.mul(b_file.transpose(1, 2), torch.tensor(scales)[:, None, None], out=b)  # B·s, ≥ fp32 math
    weights = LoRAWeights(
        path,
        adapter_key(path) or "",
        max(entry[1] for entry in layout),
        tuple(sorted({m.rsplit(".", 1)[-1] for g in groups for m in g.names})),
        flat,
        tuple(sorted(layout)),
    )
    if not _all_finite(flat):
        bad = next(m for m, (a, b) in weights.modules.items() if not (a.isfinite().all() and b.isfinite().all()))
        raise InvalidAdapter(f"{bad}: LoRA weights contain NaN or Inf")
    return weights


_TARGETING = ("r", "rank_pattern", "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern")


def _check_against_config(config: dict, groups: tuple[_ModuleGroup, ...]) -> None:
    """The tensors must be what the config says: PEFT builds each module's LoRA from the config (rank from `r` /
    `rank_pattern`, modules from `target_modules`, `exclude_modules`, `layers_to_transform`), refuses tensors of
    another rank and ignores tensors of modules it did not build. Serving either would scale by the wrong alpha/r
    or add modules the adapter's reference (PEFT) never applies: refused instead."""
    default_r = config.get("r", 8)
    rank_pattern = config.get("rank_pattern") or {}
    for g in groups:
        for module in g.names:
            if not _targeted(config, module):
                raise InvalidAdapter(
                    f"{module} has LoRA weights but adapter_config.json does not target it "
                    f"(target_modules={config.get('target_modules')!r})"
                )
            if g.r != (want := _pattern_value(rank_pattern, module, default_r)):
                raise InvalidAdapter(f"{module}: LoRA weights of rank {g.r}, but adapter_config.json says r={want}")


def _targeted(config: dict, module: str) -> bool:
    """PEFT's check_target_module_exists, for the config keys that decide which modules get a LoRA."""
    targets, exclude = config.get("target_modules"), config.get("exclude_modules")
    if exclude and _names(exclude, module):
        return False
    if targets is not None and targets != "all-linear" and not _names(targets, module):
        return False  # no target_modules: PEFT's per-architecture default; not second-guessed here
    layers = config.get("layers_to_transform")
    if layers is None:
        return True
    pattern = config.get("layers_pattern") or ["layers", "h", "blocks", "layer"]
    pattern = [pattern] if isinstance(pattern, str) else pattern
    layer = next((m for p in pattern if (m := re.match(rf".*\.{p}\.(\d+)\.", module))), None)
    layers = [layers] if isinstance(layers, int) else layers
    return layer is not None and int(layer[1]) in layers


def _names(spec, module: str) -> bool:
    """A string is a regex over the whole module path; a list names modules by their dotted suffix."""
    if isinstance(spec, str):
        return re.fullmatch(spec, module) is not None
    return any(module == t or module.endswith(f".{t}") for t in spec)


def _scale(module: str, r: int, alpha: float, alpha_pattern: dict, use_rslora: bool) -> float:
    m_alpha = float(_pattern_value(alpha_pattern, module, alpha))
    return m_alpha / math.sqrt(r) if use_rslora else m_alpha / r


def _group(data: np.ndarray, tensors: tuple[_Tensor, ...]) -> torch.Tensor:
    """One group's tensors (same shape and dtype) as one torch tensor [n, *shape]: a strided view of the file's
    bytes when they lie equally spaced and aligned in it (a file sorted by name, as PEFT's are, keeps each module
    kind's tensors one layer apart: one view instead of one per tensor), else stacked into a copy."""
    np_dtype, torch_dtype = _FLOATS[tensors[0].dtype]
    shape, count = tensors[0].shape, math.prod(tensors[0].shape)
    begins = [t.begin for t in tensors]
    size = np_dtype.itemsize
    step = begins[1] - begins[0] if len(begins) > 1 else count * size
    spaced = step > 0 and begins == list(range(begins[0], begins[-1] + 1, step))
    if spaced and begins[0] % size == step % size == 0:
        first = np.frombuffer(data, np_dtype, count, begins[0]).reshape(shape)
        view = np.lib.stride_tricks.as_strided(first, (len(begins), *shape), (step, *first.strides))
    else:
        view = np.stack([np.frombuffer(data, np_dtype, count, begin).reshape(shape) for begin in begins])
    return torch.from_numpy(view).view(torch_dtype)


def _all_finite(x: torch.Tensor) -> bool:
    """A NaN or Inf anywhere makes the sum non-finite, so a finite sum clears `x` in one read without a mask;
    only a non-finite sum (a bad tensor, or finite values that overflow) takes the exact elementwise check."""
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())


def adapter_key(path: Path) -> str | None:
    """Identity of the weights now at `path`: its location and the weights file's stamp (None if gone)."""
    try:
        stat = (path / WEIGHTS_FILE).stat()
    except OSError:
        return None
    return f"{path.resolve()}#{stat.st_ino}:{stat.st_mtime_ns}:{stat.st_size}"


@dataclass(frozen=True, slots=True)
class _ModuleGroup:
    """The modules of one kind (q_proj, ...) with one shape and dtype, converted together: names sorted."""

    names: tuple[str, ...]
    r: int
    in_features: int
    out_features: int
    a: tuple[_Tensor, ...]  # [r, in] each, in names' order
    b: tuple[_Tensor, ...]  # [out, r] each


def _plan(data: np.ndarray, shapes: dict[str, ModuleShape], max_rank: int, config: dict) -> tuple[_ModuleGroup, ...]:
    """The checked module groups of a weights file (`data`: its bytes), from its header and the config's
    targeting keys (`_TARGETING`).

    Those decide everything here: the tensors' names, dtypes, shapes and offsets, so every check of
    `_parse_header`, `_check_pair` and `_check_against_config` and the grouping give the same answer for the
    same header bytes, file size, rank limit, base model and targeting. Adapters trained with one config (most of
    a tenant fleet) share both, so the plan is kept per header and targeting (`PLAN_CACHE_SIZE`): a SmolLM2
    rank-8 read (420 tensors) took 2.2 ms with it against 3.5 ms with the header planned anew
    (bench.adapter_scaling's cold loads, side by side), and the config check alone takes ≈0.8 ms (ad hoc). Only
    valid plans are kept, and a hit compares the header bytes whole.
    """
    if len(data) < 8:
        raise _bad_file("shorter than its 8-byte header size")
    (n,) = struct.unpack_from("<Q", data)
    if n > min(len(data) - 8, MAX_HEADER_BYTES):
        raise _bad_file(f"a header of {n} bytes in a file of {len(data)}")
    header = data[8 : 8 + n].tobytes()
    key = (header, len(data), max_rank, id(shapes), json.dumps([config.get(k) for k in _TARGETING]))
    with _plans_lock:
        hit = _plans.get(key)
    if hit is not None and hit[0] is shapes:  # the shapes held by the entry keep their id from being reused
        return hit[1]
    pairs = _pairs(_parse_header(header, 8 + n, len(data) - 8 - n))
    if not pairs:
        raise InvalidAdapter(f"{WEIGHTS_FILE} holds no LoRA tensors")
    by_kind: dict[tuple, list[tuple[str, _Tensor, _Tensor]]] = {}
    for module in sorted(pairs):
        a, b = _check_pair(module, pairs[module], shapes, max_rank)
        by_kind.setdefault((module.rsplit(".", 1)[-1], a.shape, b.shape, a.dtype, b.dtype), []).append((module, a, b))
    groups = tuple(
        _ModuleGroup(
            tuple(m for m, _, _ in mods), r, in_f, out, tuple(a for _, a, _ in mods), tuple(b for *_, b in mods)
        )
        for (_, (_, in_f), (out, r), _, _), mods in by_kind.items()
    )
    _check_against_config(config, groups)
    with _plans_lock:
        _plans[key] = (shapes, groups)
    return groups


def _pairs(tensors: dict[str, _Tensor]) -> dict[str, dict[str, _Tensor]]:
    pairs: dict[str, dict[str, _Tensor]] = {}
    for key, tensor in tensors.items():
        if "lora_embedding" in key:
            raise InvalidAdapter(f"embedding LoRA is not supported ({key})")
        if "lora_magnitude_vector" in key:
            raise InvalidAdapter("DoRA adapters (lora_magnitude_vector) are not supported")
        if (pairs_key := _KEY.match(key)) is None:
            raise InvalidAdapter(f"unexpected tensor {key!r} (only lora_A/lora_B weights are supported)")
        pairs.setdefault(pairs_key["module"], {})[pairs_key["ab"]] = tensor
    return pairs


def _bad_file(why: str) -> InvalidAdapter:
    return InvalidAdapter(f"{WEIGHTS_FILE} is not a valid safetensors file: {why}")


def _parse_header(header: bytes, start: int, size: int) -> dict[str, _Tensor]:
    """A safetensors file's tensors from its JSON header, checked as safetensors does (`start`: where the data
    bytes begin in the file; `size`: how many there are).

    Not `safetensors.torch.load`: it copies every tensor into a buffer of its own and wraps each in a torch
    tensor (≈7 µs an op, 420 tensors for SmolLM2), most of a read that the engine does between two steps; here
    the bytes are read once, into this thread's read buffer, and `load_adapter` converts each module group once,
    from a view of them into the adapter's own buffer. Not `safe_open`: with
    get_tensor (safetensors 0.8) RSS grew ≈7 KB per file in a 3,000-load loop, which a server reloading cold
    adapters all day cannot afford.
    """
    try:
        parsed = jsonread.loads(header, "the header", MAX_HEADER_BYTES)
    except jsonread.BadJSON as e:
        raise _bad_file(str(e)) from None
    if not isinstance(parsed, dict):
        raise _bad_file("the header is not a JSON object")
    tensors, spans = {}, []
    for key, info in parsed.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            itemsize = _ITEMSIZE[dtype]
            if not all(type(d) is int and d >= 0 for d in (*shape, begin, end)):
                raise ValueError
        except (TypeError, KeyError, ValueError):
            raise _bad_file(f"tensor {key!r} has no valid dtype, shape and data_offsets") from None
        count = math.prod(shape)
        if not begin <= end <= size or end - begin != count * itemsize:
            raise _bad_file(f"tensor {key!r}: offsets {begin}..{end} do not hold {shape} {dtype} in {size} data bytes")
        tensors[key] = _Tensor(dtype, tuple(shape), start + begin)
        spans.append((begin, end, key))
    at = 0  # as safetensors: the tensors tile the data bytes, no gap or overlap
    for begin, end, key in sorted(spans):
        if begin != at:
            raise _bad_file(f"tensor {key!r} starts at byte {begin} of the data, not at {at} where the one before ends")
        at = end
    if at != size:
        raise _bad_file(f"the tensors end at byte {at} of {size} data bytes")
    return tensors


def _read_file(path: Path) -> np.ndarray:
    """The file's bytes in this thread's read buffer (valid until the thread's next read): reads of similar
    files reuse one buffer's pages instead of faulting in fresh ones, which cost more than the read itself."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        buf = getattr(_read_buffer, "buf", None)
        if buf is None or buf.nbytes < size:
            buf = np.empty(size, np.uint8)
            if size <= KEEP_READ_BUFFER_BYTES:
                _read_buffer.buf = buf
        n = f.readinto(memoryview(buf)[:size])
    return buf[:n]


def _check_pair(
    module: str, pair: dict[str, _Tensor], shapes: dict[str, ModuleShape], max_rank: int
) -> tuple[_Tensor, _Tensor]:
    if module.rsplit(".", 1)[-1] in _EMBEDDING_NAMES:
        raise InvalidAdapter(f"embedding/lm_head targets are not supported ({module})")
    if set(pair) != {"A", "B"}:
        missing = "lora_B" if "A" in pair else "lora_A"
        raise InvalidAdapter(f"{module}: {missing} weight is missing")
    shape = shapes.get(module)
    if shape is None:
        raise InvalidAdapter(f"module {module} does not exist in the base model (adapter for another architecture?)")
    a, b = pair["A"], pair["B"]
    if a.dtype not in _FLOATS or b.dtype not in _FLOATS:
        raise InvalidAdapter(
            f"{module}: LoRA weights must be floating point of one of {', '.join(_FLOATS)}, got {a.dtype}/{b.dtype}"
        )
    if len(a.shape) != 2 or len(b.shape) != 2:
        raise InvalidAdapter(f"{module}: LoRA weights must be 2-D, got {a.shape} and {b.shape}")
    r = a.shape[0]
    if r < 1:
        raise InvalidAdapter(f"{module}: rank must be ≥ 1")
    if r > max_rank:
        raise InvalidAdapter(f"rank {r} of {module} exceeds max_lora_rank {max_rank}")
    if a.shape[1] != shape.in_features or b.shape != (shape.out_features, r):
        raise InvalidAdapter(
            f"{module}: shapes A{a.shape} B{b.shape} do not match the base model "
            f"(expected A[r, {shape.in_features}], B[{shape.out_features}, r])"
        )
    return a, b
