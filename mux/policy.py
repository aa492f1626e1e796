"""The server's policy file (TOML): eviction policy, tier sizes, scheduling, pinned adapters, keys and tenants,
the gRPC service."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from mux.config import GrpcConfig, LoRAConfig, SchedulerConfig
from mux.errors import MuxError
from mux.lora.policies import POLICIES
from mux.server.batch_store import BatchConfig
from mux.server.limits import TenantLimit

DEFAULT_POLICY = Path(__file__).resolve().parent.parent / "policies" / "default.toml"
_SECTIONS = {
    *("eviction", "tiers", "scheduler", "streaming", "pinned"),
    *("admin", "tenants", "public", "limits", "batch", "grpc", "model"),
}
_TIERS = {"max_loras", "max_lora_rank", "max_lora_bytes", "max_cpu_loras", "max_cpu_adapter_bytes"}
_KEY_HASH = re.compile(r"^sha256:[0-9a-f]{64}$")
_TENANT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True, slots=True)
class Policy:
    lora: LoRAConfig
    scheduler: SchedulerConfig
    pinned: tuple[str, ...]
    admin_keys: tuple[str, ...] = ()  # "sha256:<hex>" each
    tenant_keys: dict[str, tuple[str, ...]] | None = None  # tenant -> its key hashes
    public: tuple[str, ...] = ()  # adapter id patterns any caller may use, e.g. "demo/*"
    limits: TenantLimit = field(default_factory=TenantLimit)  # [limits]: each tenant unless its section says
    tenant_limits: dict[str, TenantLimit] | None = None
    stream_interval: int = 1  # [streaming] interval: OpenAI streams send tokens this many at a time after the first
    batch: BatchConfig = field(default_factory=BatchConfig)  # [batch]: file and line limits, token weight
    grpc: GrpcConfig = field(default_factory=GrpcConfig)  # [grpc] port, max_message_bytes
    quantization: str = "none"  # [model] quantization: none | int8 | int4 (mux/model/quant.py)


def load_policy(path: str | Path | None = None, **overrides) -> Policy:
    """Read a policy file; keyword overrides (None = keep) win over the file, e.g. max_loras=8, grpc_port=8001."""
    path = Path(path) if path else DEFAULT_POLICY
    try:
        data = tomllib.loads(path.read_text()) if path.is_file() else {}
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise MuxError(f"policy file {path}: {e}") from None
    if path != DEFAULT_POLICY and not path.is_file():
        raise MuxError(f"policy file {path} does not exist")
    _only(data, _SECTIONS, "top level")
    eviction, tiers = data.get("eviction", {}), data.get("tiers", {})
    _only(eviction, {"policy"}, "[eviction]")
    _only(tiers, _TIERS, "[tiers]")
    lora_values = {**tiers, **({"eviction_policy": eviction["policy"]} if "policy" in eviction else {})}
    flags = {k: v for k, v in overrides.items() if k in _TIERS and v is not None}
    lora_values.update(flags)
    scheduler = data.get("scheduler", {})
    _only(scheduler, {f.name for f in fields(SchedulerConfig)}, "[scheduler]")
    pinned = _strings(data.get("pinned", {}), "adapters", "[pinned]", path)
    public = _strings(data.get("public", {}), "adapters", "[public]", path)
    admin_keys = _key_hashes(data.get("admin", {}), "[admin]", path)
    tenants = data.get("tenants", {})
    if not isinstance(tenants, dict) or not all(_TENANT.match(t) for t in tenants):
        raise MuxError(f"policy file {path}: [tenants.<name>] names must be simple identifiers")
    limit_keys = {f.name for f in fields(TenantLimit)}
    tenant_keys = {t: _key_hashes(v, f"[tenants.{t}]", path, limit_keys) for t, v in tenants.items()}
    _only(data.get("limits", {}), limit_keys, "[limits]")
    limits = _limit(data.get("limits", {}), TenantLimit(), "[limits]", path)
    tenant_limits = {t: _limit(v, limits, f"[tenants.{t}]", path) for t, v in tenants.items()}
    streaming = data.get("streaming", {})
    _only(streaming, {"interval"}, "[streaming]")
    interval = overrides.get("stream_interval")
    interval = streaming.get("interval", 1) if interval is None else interval
    if type(interval) is not int or not 1 <= interval <= 1024:
        raise MuxError(f"policy file {path}: the stream interval must be a whole number of tokens, 1 to 1024")
    batch = data.get("batch", {})
    _only(batch, {f.name for f in fields(BatchConfig)}, "[batch]")
    grpc = data.get("grpc", {})
    _only(grpc, {"port", "max_message_bytes"}, "[grpc]")
    if overrides.get("grpc_port") is not None:
        grpc = {**grpc, "port": overrides["grpc_port"]}
    model = data.get("model", {})
    _only(model, {"quantization"}, "[model]")
    quantization = overrides.get("quantization") or model.get("quantization", "none")
    if quantization not in ("none", "int8", "int4"):
        raise MuxError(f"policy file {path}: unknown quantization {quantization!r} (none, int8 or int4)")
    try:
        if lora_values.get("eviction_policy", "lru") not in POLICIES:
            raise ValueError(f"unknown eviction policy {lora_values['eviction_policy']!r}")
        return Policy(
            replace(LoRAConfig(), **lora_values),
            replace(SchedulerConfig(), **scheduler),
            pinned,
            admin_keys,
            tenant_keys,
            public,
            limits,
            tenant_limits,
            interval,
            replace(BatchConfig(), **batch),
            GrpcConfig(**grpc),
            quantization,
        )
    except (TypeError, ValueError) as e:  # a bad value may come from the file or from an override (a CLI flag)
        where = f"policy file {path}" + (f" with overrides {', '.join(sorted(flags))}" if flags else "")
        raise MuxError(f"{where}: {e}") from None


def _only(section: dict, allowed: set[str], where: str) -> None:
    unknown = set(section) - allowed
    if unknown:
        raise MuxError(f"unknown key(s) in {where} of the policy file: {', '.join(sorted(unknown))}")


def _strings(section: dict, key: str, where: str, path: Path) -> tuple[str, ...]:
    values = section.get(key, []) if isinstance(section, dict) else None
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise MuxError(f"policy file {path}: {where} {key} must be a list of strings")
    return tuple(values)


def _limit(section: dict, default: TenantLimit, where: str, path: Path) -> TenantLimit:
    values = {f.name: section[f.name] for f in fields(TenantLimit) if f.name in section}
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise MuxError(f"policy file {path}: {where} {key} must be a positive integer")
    return replace(default, **values)


def _key_hashes(section: dict, where: str, path: Path, also: set[str] = frozenset()) -> tuple[str, ...]:
    """The section's `keys` (sha256 hashes); `also` names the other keys the section may hold."""
    _only(section if isinstance(section, dict) else {}, {"keys"} | also, where)
    keys = _strings(section, "keys", where, path)
    if not all(_KEY_HASH.match(k) for k in keys):  # the offending value is not echoed: it may be a secret
        raise MuxError(
            f"policy file {path}: {where} keys must be stored hashed as sha256:<64 hex> (`mux hash-key KEY` prints one)"
        )
    return keys
