"""Frozen configuration dataclasses, one per concern; each component receives only its own."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

CPU_BATCHED_TOKENS = 512  # SchedulerConfig's default step budget on a CPU


def cache_root() -> Path:
    """Where converted models and built kernels are kept (MUX_CACHE_DIR, default ~/.cache/lora-mux)."""
    return Path(os.environ.get("MUX_CACHE_DIR", Path.home() / ".cache" / "lora-mux"))


def _positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be ≥ 1, got {value}")


@dataclass(frozen=True, slots=True)
class ModelConfig:
    model: str | None = None  # a local HF directory; None = the embedded SmolLM2 default
    served_model_name: str | None = None
    # auto | float32 | float16 | bfloat16. auto: fp16 on CUDA; on a CPU fp32, with the linears' weights in bf16
    # where they measure faster (mux/model/linear_picks.py). bfloat16 on a CPU: the linears' weights in bf16,
    # everything else fp32 (activations, LoRA, attention, KV cache); float16 on a CPU: torch's kernels throughout.
    dtype: str = "auto"
    device: str = "auto"  # auto | cpu | cuda
    # none | int8 | int4: the decoder layers' linears held as weight-only integers (mux/model/quant.py); the
    # adapters, the lm_head and the embeddings keep the compute dtype
    quantization: str = "none"
    max_model_len: int | None = None
    # auto: mux's kernels where they serve, picked by measuring on the machine (CPU: the C kernels and packed
    # linears, mux/model/linear_picks.py; CUDA: the Triton ones); torch: torch's and transformers' own kernels on
    # the CPU (the reference path, and a fallback)
    backend: str = "auto"
    # decode steps through the model's own forward: no CUDA graphs (mux/engine/graphs.py), no CPU decode loop
    # (mux/engine/cpu_decode.py); vLLM's --enforce-eager
    enforce_eager: bool = False
    # A step's detokenizing and stream pushes run while the device computes the next step (each token after a
    # request's first reaches its stream one step later). None: on CUDA only, where the forward runs
    # asynchronously; on the CPU the forward is the host's own work, so there is nothing to overlap.
    overlap_output: bool | None = None

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise ValueError(f"unknown dtype {self.dtype!r}")
        if self.quantization not in ("none", "int8", "int4"):
            raise ValueError(f"unknown quantization {self.quantization!r} (none, int8 or int4)")
        if self.backend not in ("auto", "torch"):
            raise ValueError(f"unknown backend {self.backend!r} (auto or torch)")
        if self.device not in ("auto", "cpu") and not re.fullmatch(r"cuda(:\d+)?", self.device):
            raise ValueError(f"unknown device {self.device!r} (auto, cpu, cuda or cuda:N)")


MAX_LORA_RANK = 4096  # far above the ranks adapters use (≤ a few hundred); the C kernel keeps rank-sized rows


@dataclass(frozen=True, slots=True)
class LoRAConfig:
    max_loras: int = 16  # distinct adapters in one forward pass
    max_lora_rank: int = 64  # the largest rank accepted
    # the device pool's bytes, each adapter taking pages of its own rank; None: max_loras adapters of rank 16
    # (the bytes 16 slots of rank 16 took before the pool: mux/lora/layers.py)
    max_lora_bytes: int | None = None
    max_cpu_loras: int = 1024  # host tier, count bound
    max_cpu_adapter_bytes: int = 2 << 30  # host tier, byte bound
    eviction_policy: str = "lru"  # lru | lfu | cost (mux/lora/policies/)
    async_loading: bool = True  # disk→host→device copies on a loader thread while the engine steps
    # a host-tier hit up to this size is copied into its slot at once by acquire, not by the loader thread, so
    # its request joins the next step (0: never; `python -m bench.adapter_scaling --compare-inline` measures it)
    inline_load_bytes: int = 64 << 20
    # while the engine loop runs, a disk read asked for by a request thread (Engine.prepare_adapter) runs on the
    # engine's thread between steps instead of beside them (`python -m bench.adapter_scaling --compare reads`)
    reads_between_steps: bool = True

    def __post_init__(self) -> None:
        _positive(
            max_loras=self.max_loras,
            max_lora_rank=self.max_lora_rank,
            max_cpu_loras=self.max_cpu_loras,
            max_cpu_adapter_bytes=self.max_cpu_adapter_bytes,
        )
        if self.max_lora_bytes is not None:
            _positive(max_lora_bytes=self.max_lora_bytes)
        if self.inline_load_bytes < 0:
            raise ValueError(f"inline_load_bytes must be >= 0, got {self.inline_load_bytes}")
        if self.max_lora_rank > MAX_LORA_RANK:  # the C kernel keeps a rank-sized row on each thread's stack
            raise ValueError(f"max_lora_rank must be ≤ {MAX_LORA_RANK}, got {self.max_lora_rank}")


@dataclass(frozen=True, slots=True)
class CacheConfig:
    block_size: int = 16  # tokens per KV block
    kv_cache_bytes: int = 1 << 30  # fixed KV budget; blocks are carved out of it once
    prefix_caching: bool = True  # reuse the K/V of a prompt's first full blocks within a tenant (block_manager.py)

    def __post_init__(self) -> None:
        _positive(block_size=self.block_size, kv_cache_bytes=self.kv_cache_bytes)


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_num_seqs: int = 128  # sequences in one step
    # tokens in one step (prefill chunks + decodes); None: 512 on a CPU, 2048 elsewhere (`for_device`)
    max_num_batched_tokens: int | None = None
    max_waiting: int = 4096  # admission queue bound
    starvation_steps: int = 64  # after this many skipped steps the queue head blocks new adapters
    request_timeout_s: float = 600.0  # a generation still unfinished this long after submit ends with an error
    # while at most this many sequences decode, new prompts' prefills get a step of their own (0: every step mixes
    # prefills and decodes; bench.serving measures both orders)
    prefill_first_max_decodes: int = 16
    # while online requests are live, batch-job lines take at most this share of each step's sequences and tokens
    # (an idle server runs them at full speed; bench.batch measures what online callers notice)
    batch_share: float = 0.25

    def __post_init__(self) -> None:
        _positive(max_num_seqs=self.max_num_seqs, max_waiting=self.max_waiting, starvation_steps=self.starvation_steps)
        if not 0.0 < self.batch_share <= 1.0:
            raise ValueError(f"batch_share must be in (0, 1], got {self.batch_share}")
        if self.max_num_batched_tokens is not None:
            _positive(max_num_batched_tokens=self.max_num_batched_tokens)
        if self.prefill_first_max_decodes < 0:
            raise ValueError(f"prefill_first_max_decodes must be >= 0, got {self.prefill_first_max_decodes}")
        if not self.request_timeout_s > 0:
            raise ValueError(f"request_timeout_s must be > 0, got {self.request_timeout_s}")

    def for_device(self, device_type: str) -> SchedulerConfig:
        """The budget filled in for the device. A CPU prefills ≈650 tokens/s of SmolLM2 here: with a long prompt
        arriving, a 2,048-token step held every other stream 2.1-2.5 s, a 512-token one 0.95 s, for ≈5-20% on the
        long prompt's first token and ≈10% on a burst of prefills (`python -m bench.long_prompt`). A GPU runs
        2,048 tokens in tens of milliseconds."""
        if self.max_num_batched_tokens is not None:
            return self
        return replace(self, max_num_batched_tokens=CPU_BATCHED_TOKENS if device_type == "cpu" else 2048)


@dataclass(frozen=True, slots=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)


MAX_GRPC_MESSAGE_BYTES = (2 << 30) - 1  # gRPC's own ceiling: message lengths are 32-bit signed


@dataclass(frozen=True, slots=True)
class GrpcConfig:
    """KServe v2's gRPC service beside the HTTP server (mux/server/grpc_service.py)."""

    port: int | None = None  # None: not served
    host: str = "127.0.0.1"  # the HTTP server's address (`mux serve --host`): one bind for both
    # a request message past this is refused (RESOURCE_EXHAUSTED) by gRPC before it reaches a handler; 4 MiB
    # as the HTTP bodies' bound, and gRPC's own default
    max_message_bytes: int = 4 << 20

    def __post_init__(self) -> None:
        if self.port is not None and (isinstance(self.port, bool) or not 1 <= self.port <= 65535):
            raise ValueError(f"the gRPC port must be 1 to 65535, got {self.port}")
        if not 1024 <= self.max_message_bytes <= MAX_GRPC_MESSAGE_BYTES:
            raise ValueError(f"grpc max_message_bytes must be 1024 to {MAX_GRPC_MESSAGE_BYTES}")
