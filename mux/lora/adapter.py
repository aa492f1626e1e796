"""Reading and validating a PEFT LoRA adapter directory into per-module (A, B·scale) host tensors.

Everything is checked before any slot is touched; pickle weights are never unpickled.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mux.errors import InvalidAdapter

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MAX_CONFIG_BYTES = 1 << 20
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit on a file's JSON header
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


@dataclass(frozen=True, slots=True)
class _Tensor:
    """One tensor of the weights file: its safetensors dtype and a view of the file's bytes (None unless float)."""

    dtype: str
    shape: tuple[int, ...]
    array: np.ndarray | None


@dataclass(frozen=True, slots=True)
class ModuleShape:
    in_features: int
    out_features: int


@dataclass(frozen=True, slots=True)
class LoRAWeights:
    """A validated adapter on the host. Scale is folded into B; tensors are laid out for the slot copy."""

    path: Path
    key: str  # identity of these exact weights: path + file stamp (a rewrite is a new key)
    rank: int  # the largest module rank
    target_modules: tuple[str, ...]  # short names, sorted: ("k_proj", "q_proj", ...)
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module path -> (A [r, in], B·s [r, out])
    nbytes: int


def read_config(path: Path) -> dict:
    cfg_file = path / CONFIG_FILE
    if not path.is_dir():
        raise InvalidAdapter(f"adapter directory {path} does not exist")
    if not cfg_file.is_file():
        raise InvalidAdapter(f"missing {CONFIG_FILE} in {path.name}")
    if cfg_file.stat().st_size > MAX_CONFIG_BYTES:
        raise InvalidAdapter(f"{CONFIG_FILE} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        config = json.loads(cfg_file.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidAdapter(f"{CONFIG_FILE} is not valid JSON: {e}") from None
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
    for key in ("r", "lora_alpha"):
        value = config.get(key, 8)
        if not _positive_number(value):
            raise InvalidAdapter(f"{key} must be a positive number, got {value!r}")
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
                raise InvalidAdapter(f"{key}[{pattern!r}] must be a positive number, got {value!r}")


def _positive_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _pattern_value(patterns: dict, module: str, default: float) -> float:
    # PEFT's get_pattern_key: a pattern matches a module name's dotted suffix.
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def load_adapter(
    path: Path, shapes: dict[str, ModuleShape], max_rank: int, dtype: torch.dtype = torch.float32
) -> LoRAWeights:
    """Read and validate the adapter at `path` against the base model's targetable modules."""
    path = Path(path)
    config = read_config(path)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        if (path / "adapter_model.bin").exists():
            raise InvalidAdapter(PICKLE_REFUSED)
        raise InvalidAdapter(f"missing {WEIGHTS_FILE} in {path.name}")
    pairs = _read_pairs(weights)
    if not pairs:
        raise InvalidAdapter(f"{WEIGHTS_FILE} holds no LoRA tensors")

    use_rslora = bool(config.get("use_rslora", False))
    alpha = float(config.get("lora_alpha", 8))
    alpha_pattern = config.get("alpha_pattern") or {}
    checked = {module: _check_pair(module, pairs[module], shapes, max_rank) for module in sorted(pairs)}
    # Modules whose A and B share shapes and dtypes are converted together: a 30-layer model has 210 pairs,
    # and per-tensor torch ops (≈7 µs each) were most of a load. B is scaled while it is promoted and
    # transposed (one pass) and finiteness is checked by a sum, not a mask. With the reader below, a SmolLM2
    # rank-8 fp16 adapter's read on one thread went from 9.4-11.6 to 7.3-8.3 ms (an ad hoc script, median of
    # 128); inside the engine, between steps of a 1,000-adapter run, from 18-22 to 14-15 ms (instrumented).
    # bench.adapter_scaling's cold loads, same run: 1.54x a safetensors.torch.load of the file (1.89x the run before).
    groups: dict[tuple, list[str]] = {}
    for module, (a, b) in checked.items():
        groups.setdefault((a.shape, b.shape, a.dtype, b.dtype), []).append(module)
    built: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for (_, (out, r), a_dtype, b_dtype), names in groups.items():
        scales = []
        for module in names:
            m_alpha = float(_pattern_value(alpha_pattern, module, alpha))
            scales.append(m_alpha / math.sqrt(r) if use_rslora else m_alpha / r)
        a = _stacked([checked[m][0] for m in names], a_dtype).to(dtype)  # [n, r, in]
        b = _stacked([checked[m][1] for m in names], b_dtype)  # [n, out, r]
        scaled = torch.empty((len(names), r, out), dtype=torch.promote_types(b.dtype, torch.float32))
        torch.mul(b.transpose(1, 2), torch.tensor(scales)[:, None, None], out=scaled)  # B·s, ≥fp32 [n, r, out]
        b = scaled.to(dtype)
        if not (_all_finite(a) and _all_finite(b)):
            finite = [bool(torch.isfinite(a[i]).all() and torch.isfinite(b[i]).all()) for i in range(len(names))]
            bad = names[finite.index(False)]
            raise InvalidAdapter(f"{bad}: LoRA weights contain NaN or Inf")
        built.update(zip(names, zip(a.unbind(), b.unbind(), strict=True), strict=True))
    modules = {m: built[m] for m in sorted(built)}  # each (A [r, in], B·scale [r, out]), contiguous views
    max_r = max(a.shape[0] for a, _ in modules.values())
    nbytes = sum(a.nbytes + b.nbytes for a, b in modules.values())
    targets = tuple(sorted({m.rsplit(".", 1)[-1] for m in modules}))
    return LoRAWeights(path, adapter_key(path) or "", max_r, targets, modules, nbytes)


def _stacked(tensors: list[_Tensor], dtype: str) -> torch.Tensor:
    """One group's tensors (same shape and dtype) stacked into a new torch tensor [n, *shape]: one copy."""
    return torch.from_numpy(np.stack([t.array for t in tensors])).view(_FLOATS[dtype][1])


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


def _read_pairs(weights: Path) -> dict[str, dict[str, _Tensor]]:
    pairs: dict[str, dict[str, _Tensor]] = {}
    for key, tensor in _read_safetensors(weights).items():
        if "lora_embedding" in key:
            raise InvalidAdapter(f"embedding LoRA is not supported ({key})")
        if "lora_magnitude_vector" in key:
            raise InvalidAdapter("DoRA adapters (lora_magnitude_vector) are not supported")
        if (pairs_key := _KEY.match(key)) is None:
            raise InvalidAdapter(f"unexpected tensor {key!r} (only lora_A/lora_B weights are supported)")
        pairs.setdefault(pairs_key["module"], {})[pairs_key["ab"]] = tensor
    return pairs


def _read_safetensors(weights: Path) -> dict[str, _Tensor]:
    """The tensors of a safetensors file as numpy views of its bytes, the header checked as safetensors does.

    Not `safetensors.torch.load`: it copies every tensor into a buffer of its own and wraps each in a torch
    tensor (≈7 µs an op, 420 tensors for SmolLM2), most of a read that the engine does between two steps; here
    the bytes are read once and each module group is copied once, when it is stacked. Not `safe_open`: with
    get_tensor (safetensors 0.8) RSS grew ≈7 KB per file in a 3,000-load loop, which a server reloading cold
    adapters all day cannot afford.
    """

    def bad(why: str) -> InvalidAdapter:
        return InvalidAdapter(f"{WEIGHTS_FILE} is not a valid safetensors file: {why}")

    try:
        data = weights.read_bytes()
    except OSError as e:
        raise InvalidAdapter(f"{WEIGHTS_FILE} could not be read: {e}") from None
    if len(data) < 8:
        raise bad("shorter than its 8-byte header size")
    (n,) = struct.unpack_from("<Q", data)
    if n > min(len(data) - 8, MAX_HEADER_BYTES):
        raise bad(f"a header of {n} bytes in a file of {len(data)}")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise bad(f"the header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    start, size = 8 + n, len(data) - 8 - n
    tensors = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            itemsize = _ITEMSIZE[dtype]
            if not all(type(d) is int and d >= 0 for d in (*shape, begin, end)):
                raise ValueError
        except (TypeError, KeyError, ValueError):
            raise bad(f"tensor {key!r} has no valid dtype, shape and data_offsets") from None
        count = math.prod(shape)
        if not begin <= end <= size or end - begin != count * itemsize:
            raise bad(f"tensor {key!r}: offsets {begin}..{end} do not hold {shape} {dtype} in {size} data bytes")
        array = None
        if dtype in _FLOATS:
            array = np.frombuffer(data, _FLOATS[dtype][0], count, start + begin).reshape(shape)
        tensors[key] = _Tensor(dtype, tuple(shape), array)
    return tensors


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
    if a.array is None or b.array is None:
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
