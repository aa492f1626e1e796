"""Per-request state and options (no torch)."""

from __future__ import annotations

import enum
import itertools
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mux.errors import InvalidRequest

SAMPLING_EPS = 1e-5  # a temperature below this is greedy (vLLM's rule): logits / 1e-300 overflow to inf
MAX_TOP_LOGPROBS = 20  # OpenAI's bound on top_logprobs
SEED_RANGE = (-(1 << 63), 1 << 63)  # int64, vLLM's bound (torch.Generator refuses seeds from 2**64 up)

if TYPE_CHECKING:
    from mux.engine.detokenizer import Detokenizer
    from mux.engine.stream import RequestStream
    from mux.lora.manager import AdapterRef


@dataclass(frozen=True, slots=True)
class PromptLogprob:
    """A prompt token's logprob given the tokens before it, its rank (1 = the most likely) and alternatives."""

    logprob: float
    rank: int
    top: tuple[tuple[int, float], ...] = ()  # the most likely (token id, logprob)


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 (or below SAMPLING_EPS) = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_p: float = 0.0  # drop tokens below min_p × the top token's probability; 0 = off
    presence_penalty: float = 0.0  # OpenAI: minus this once for each token already generated
    frequency_penalty: float = 0.0  # OpenAI: minus this times how often the token was generated
    repetition_penalty: float = 1.0  # HF/vLLM: tokens of the prompt or output divided (>0) or multiplied by it
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    top_logprobs: int = 0  # alternatives (most likely tokens) reported with each token's logprob
    prompt_logprobs: int | None = None  # None: off; else each prompt token's logprob, rank and this many alternatives
    timeout_s: float | None = None  # a deadline shorter than the server's request_timeout_s (Triton's `timeout`)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or math.isnan(value) or math.isinf(value):
                raise InvalidRequest(f"{name} must be a finite number, got {value!r}")
        if self.max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be ≥ 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise InvalidRequest(f"temperature must be ≥ 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidRequest(f"top_k must be ≥ 0, got {self.top_k}")
        if self.seed is not None and not SEED_RANGE[0] <= self.seed < SEED_RANGE[1]:
            raise InvalidRequest(f"seed must be in [-2**63, 2**63), got {self.seed}")
        if any(not s for s in self.stop):
            raise InvalidRequest("stop strings must not be empty")
        for name, lo, hi in (
            ("min_p", 0, 1),
            ("presence_penalty", -2, 2),
            ("frequency_penalty", -2, 2),
            ("repetition_penalty", 1e-9, 2),
        ):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and lo <= value <= hi):
                raise InvalidRequest(f"{name} must be in [{lo:g}, {hi:g}], got {value!r}")
        if any(not (math.isfinite(b) and -100 <= b <= 100) for _, b in self.logit_bias):
            raise InvalidRequest("logit_bias values must be in [-100, 100]")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidRequest(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidRequest(f"prompt_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.prompt_logprobs}")
        if self.timeout_s is not None and not (isinstance(self.timeout_s, (int, float)) and self.timeout_s > 0):
            raise InvalidRequest(f"the request timeout must be > 0 seconds, got {self.timeout_s!r}")

    @property
    def processed(self) -> bool:
        """Do the logits change before the token is chosen (penalties or a bias)?"""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1 or self.logit_bias)

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS or self.top_k == 1


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_ids = itertools.count()


@dataclass(eq=False, slots=True)
class Sequence:
    """One generation. Token ids grow; `num_computed` counts tokens whose KV is in the cache."""

    prompt_ids: list[int]
    params: SamplingParams
    adapter: AdapterRef | None = None
    request_id: str = ""
    tenant: str | None = None  # for fair admission across tenants
    batch: bool = False  # a batch-job line: admitted after online requests, within SchedulerConfig.batch_share
    seq_id: int = field(default_factory=lambda: next(_ids))
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    num_computed: int = 0
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # prefix-cache digests of its full blocks, so far
    num_registered: int = 0  # of its blocks, those the prefix cache knows (BlockManager.commit)
    num_cached: int = 0  # prompt tokens the prefix cache served at admission (usage's cached_tokens)
    slot: int = -1  # device LoRA slot, pinned from reservation until finish/preemption; -1 = none
    finish_reason: str | None = None  # length | stop | eos | cancelled | timeout | error
    waited_steps: int = 0
    deadline: float = math.inf  # time.monotonic() past which the engine ends it ("timeout")
    stream: RequestStream | None = None
    detok: Detokenizer | None = None
    prompt_lp: list[PromptLogprob] = field(default_factory=list)  # [i]: prompt token i + 1 (prompt_logprobs)
    pending: tuple | None = None  # (token, logprob, top) whose text the engine has not yet pushed (overlap_output)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_pending(self) -> int:
        """Tokens still to run through the model before the next sample (prefill chunk or 1 decode token)."""
        return self.num_tokens - self.num_computed

    def token_ids(self, start: int, end: int) -> list[int]:
        n = len(self.prompt_ids)
        if end <= n:
            return self.prompt_ids[start:end]
        if start >= n:  # decode steps: no copy of the prompt
            return self.output_ids[start - n : end - n]
        return self.prompt_ids[start:] + self.output_ids[: end - n]
