"""Reading and validating a PEFT LoRA adapter directory into per-module (A, B·scale) host tensors.

Everything is checked before any slot is touched; pickle weights are never unpickled.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load

from mux.errors import InvalidAdapter

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MAX_CONFIG_BYTES = 1 << 20
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
    # and per-tensor ops (≈10 µs each) were most of a load. B is scaled while it is promoted (one pass, not
    # two) and finiteness is checked by a sum, not a mask: a SmolLM2 rank-8 fp16 adapter's read went from
    # 13.4 to 7.4 ms on one thread (an ad hoc script, best of 20, before and after), time the loader takes from
    # the engine's cores; bench.adapter_scaling's cold loads: 2.0-2.2x a raw safetensors read, 2.4-3.2x before.
    groups: dict[tuple, list[str]] = {}
    for module, (a, b) in checked.items():
        groups.setdefault((a.shape, b.shape, a.dtype, b.dtype), []).append(module)
    built: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for names in groups.values():
        scales = []
        for module in names:
            r = checked[module][0].shape[0]
            m_alpha = float(_pattern_value(alpha_pattern, module, alpha))
            scales.append(m_alpha / math.sqrt(r) if use_rslora else m_alpha / r)
        a = torch.stack([checked[m][0] for m in names]).to(dtype)  # [n, r, in]
        b = torch.stack([checked[m][1] for m in names]) * torch.tensor(scales)[:, None, None]  # ≥fp32 [n, out, r]
        b = b.transpose(1, 2).contiguous().to(dtype)  # [n, r, out]
        if not (_all_finite(a) and _all_finite(b)):
            finite = [bool(torch.isfinite(a[i]).all() and torch.isfinite(b[i]).all()) for i in range(len(names))]
            bad = names[finite.index(False)]
            raise InvalidAdapter(f"{bad}: LoRA weights contain NaN or Inf")
        built.update({m: (a[i], b[i]) for i, m in enumerate(names)})
    modules = {m: built[m] for m in sorted(built)}  # each (A [r, in], B·scale [r, out]), contiguous views
    max_r = max(a.shape[0] for a, _ in modules.values())
    nbytes = sum(a.nbytes + b.nbytes for a, b in modules.values())
    targets = tuple(sorted({m.rsplit(".", 1)[-1] for m in modules}))
    return LoRAWeights(path, adapter_key(path) or "", max_r, targets, modules, nbytes)


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


def _read_pairs(weights: Path) -> dict[str, dict[str, torch.Tensor]]:
    # The bytes are read and parsed in one go: with safe_open + get_tensor (safetensors 0.8) RSS grew ≈7 KB
    # per file in a 3,000-load loop, which a server reloading cold adapters all day cannot afford.
    try:
        tensors = safetensors_load(weights.read_bytes())
    except SafetensorError as e:
        raise InvalidAdapter(f"{WEIGHTS_FILE} is not a valid safetensors file: {e}") from None
    except (OSError, ValueError, RuntimeError, TypeError) as e:  # truncated data, bad offsets, unknown dtypes
        raise InvalidAdapter(f"{WEIGHTS_FILE} could not be read: {e}") from None
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if "lora_embedding" in key:
            raise InvalidAdapter(f"embedding LoRA is not supported ({key})")
        if "lora_magnitude_vector" in key:
            raise InvalidAdapter("DoRA adapters (lora_magnitude_vector) are not supported")
        if (pairs_key := _KEY.match(key)) is None:
            raise InvalidAdapter(f"unexpected tensor {key!r} (only lora_A/lora_B weights are supported)")
        pairs.setdefault(pairs_key["module"], {})[pairs_key["ab"]] = tensor
    return pairs


def _check_pair(
    module: str, pair: dict[str, torch.Tensor], shapes: dict[str, ModuleShape], max_rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    if module.rsplit(".", 1)[-1] in _EMBEDDING_NAMES:
        raise InvalidAdapter(f"embedding/lm_head targets are not supported ({module})")
    if set(pair) != {"A", "B"}:
        missing = "lora_B" if "A" in pair else "lora_A"
        raise InvalidAdapter(f"{module}: {missing} weight is missing")
    shape = shapes.get(module)
    if shape is None:
        raise InvalidAdapter(f"module {module} does not exist in the base model (adapter for another architecture?)")
    a, b = pair["A"], pair["B"]
    if not (a.is_floating_point() and b.is_floating_point()):
        raise InvalidAdapter(f"{module}: LoRA weights must be floating point, got {a.dtype}/{b.dtype}")
    if a.dim() != 2 or b.dim() != 2:
        raise InvalidAdapter(f"{module}: LoRA weights must be 2-D, got {tuple(a.shape)} and {tuple(b.shape)}")
    r = a.shape[0]
    if r < 1:
        raise InvalidAdapter(f"{module}: rank must be ≥ 1")
    if r > max_rank:
        raise InvalidAdapter(f"rank {r} of {module} exceeds max_lora_rank {max_rank}")
    if a.shape[1] != shape.in_features or tuple(b.shape) != (shape.out_features, r):
        raise InvalidAdapter(
            f"{module}: shapes A{tuple(a.shape)} B{tuple(b.shape)} do not match the base model "
            f"(expected A[r, {shape.in_features}], B[{shape.out_features}, r])"
        )
    return a, b
