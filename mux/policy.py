"""The server's policy file (TOML): eviction policy, tier sizes, scheduling, pinned adapters."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path

from mux.config import LoRAConfig, SchedulerConfig
from mux.errors import MuxError
from mux.lora.policies import POLICIES

DEFAULT_POLICY = Path(__file__).resolve().parent.parent / "policies" / "default.toml"
_TIERS = {"max_loras", "max_lora_rank", "max_cpu_loras", "max_cpu_adapter_bytes"}


@dataclass(frozen=True, slots=True)
class Policy:
    lora: LoRAConfig
    scheduler: SchedulerConfig
    pinned: tuple[str, ...]


def load_policy(path: str | Path | None = None, **overrides) -> Policy:
    """Read a policy file; keyword overrides (None = keep) win over the file, e.g. max_loras=8."""
    path = Path(path) if path else DEFAULT_POLICY
    try:
        data = tomllib.loads(path.read_text()) if path.is_file() else {}
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise MuxError(f"policy file {path}: {e}") from None
    if path != DEFAULT_POLICY and not path.is_file():
        raise MuxError(f"policy file {path} does not exist")
    _only(data, {"eviction", "tiers", "scheduler", "pinned"}, "top level")
    eviction, tiers = data.get("eviction", {}), data.get("tiers", {})
    _only(eviction, {"policy"}, "[eviction]")
    _only(tiers, _TIERS, "[tiers]")
    lora_values = {**tiers, **({"eviction_policy": eviction["policy"]} if "policy" in eviction else {})}
    lora_values.update({k: v for k, v in overrides.items() if k in _TIERS and v is not None})
    scheduler = data.get("scheduler", {})
    _only(scheduler, {f.name for f in fields(SchedulerConfig)}, "[scheduler]")
    pinned = data.get("pinned", {}).get("adapters", [])
    if not isinstance(pinned, list) or not all(isinstance(a, str) for a in pinned):
        raise MuxError(f"policy file {path}: [pinned] adapters must be a list of adapter ids")
    try:
        if lora_values.get("eviction_policy", "lru") not in POLICIES:
            raise ValueError(f"unknown eviction policy {lora_values['eviction_policy']!r}")
        return Policy(replace(LoRAConfig(), **lora_values), replace(SchedulerConfig(), **scheduler), tuple(pinned))
    except (TypeError, ValueError) as e:
        raise MuxError(f"policy file {path}: {e}") from None


def _only(section: dict, allowed: set[str], where: str) -> None:
    unknown = set(section) - allowed
    if unknown:
        raise MuxError(f"unknown key(s) in {where} of the policy file: {', '.join(sorted(unknown))}")
