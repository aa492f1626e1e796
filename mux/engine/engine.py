"""The engine: owns the model, KV cache and adapter slots; runs schedule -> load -> run -> postprocess.

Callers on any thread use `submit` (returns a RequestStream), `cancel` and `generate`. With `start()`
the loop runs on its own thread; without it, reading a stream drives the steps inline.
"""

from __future__ import annotations

import gc
import itertools
import logging
import math
import queue
import threading
import time
from collections import Counter, deque
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path

import torch

from mux import native, triton_ops
from mux.config import EngineConfig
from mux.engine.block_manager import BlockManager
from mux.engine.detokenizer import Detokenizer
from mux.engine.kv_cache import KVCache
from mux.engine.runner import ModelRunner
from mux.engine.sampler import Sampler
from mux.engine.scheduler import Scheduler, SchedulerOutput
from mux.engine.sequence import SamplingParams, Sequence, Status
from mux.engine.stream import Completion, RequestStream, TokenEvent
from mux.engine.torch_thread import TorchThread
from mux.errors import InvalidRequest, MuxError, Overloaded
from mux.lora.layers import MultiLoRAModel
from mux.lora.manager import AdapterManager, AdapterRef
from mux.model import linear_picks, quant
from mux.model.cpu import PackedLinear, can_pack, pack_linears
from mux.model.cpu_layers import fuse_layers, fuse_rope
from mux.model.cuda import fuse_rms_norms
from mux.model.loader import BaseModel, load_base_model
from mux.runtime import picks
from mux.runtime.cpu import keep_freed_memory

log = logging.getLogger(__name__)
_request_ids = itertools.count()
READS_PER_STEP = 4  # disk reads the loop does between two steps (≈7 ms each for a SmolLM2 rank-8 adapter)


def freeze_heap() -> None:
    """For a process that keeps one engine for life (the server): move every Python object now alive (the
    model's modules and parameters, the tokenizer: ≈370k objects for SmolLM2) out of the cyclic collector's
    reach. A full collection then scans only what requests created since: it took ≈0.2 s before, with the GIL
    held, on whichever thread allocated (often the engine's, between steps), and ≈0.03 s after (an instrumented
    1,000-adapter bench.adapter_scaling run). Not for tests or tools that build engines and drop them: frozen
    objects in reference cycles are never freed."""
    gc.collect()
    gc.freeze()


class Engine:
    def __init__(
        self, config: EngineConfig | None = None, base: BaseModel | None = None, torch_thread: TorchThread | None = None
    ) -> None:
        # builds the model and runs every step: one OpenMP team (a benchmark may share one with its baselines)
        self.torch = torch_thread or TorchThread("mux-engine")
        self.torch.call(self._build, config or EngineConfig(), base)

    def _build(self, config: EngineConfig, base: BaseModel | None) -> None:
        self.config = config
        self.base = base or load_base_model(config.model)
        model = self.base.model
        self.tokenizer = self.base.tokenizer
        self.eos_ids = frozenset(self.base.eos_token_ids)
        mux_kernels = config.model.backend == "auto"  # else torch's and transformers' own (mux/config.py)
        self._quantize(model, config.model)
        self.lora = MultiLoRAModel(
            model,
            config.lora.max_loras,
            config.lora.max_lora_rank,
            config.lora.max_lora_bytes,
            use_native=mux_kernels and picks.choice("lora_kernel", "c") == "c",
            fused_few_rows=picks.choice("lora_fused", "fused") == "fused",
        )
        self.linear_plan = None  # CPU: the measured picks of the linears' kernels and weight dtype
        if mux_kernels and can_pack(model):
            self.linear_plan = linear_picks.plan(model, config.model.dtype)
            pack_linears(model, self.linear_plan.for_linear)  # after the LoRA wrap: each wrapped base and the lm_head
            keep_freed_memory()
            log.info("CPU linears: %s", self.linear_plan.report())
        device = next(model.parameters()).device
        config = self.config = replace(config, scheduler=config.scheduler.for_device(device.type))
        if device.type == "cuda":
            fuse_rms_norms(model)
            if triton_ops.serves(device):
                fuse_rope(model)  # RoPE in place in one Triton kernel
        elif mux_kernels and picks.choice("layers", "c") == "c" and native.serves(device, model.dtype):
            fuse_layers(model)
        native_attention = mux_kernels and picks.choice("attention", "c") == "c"
        self.cache = KVCache.for_model(model.config, config.cache, model.dtype, device, native_attention)
        self.blocks = BlockManager(self.cache.num_blocks, self.cache.block_size, config.cache.prefix_caching)
        self.adapters = AdapterManager(self.lora, config.lora)
        self.scheduler = Scheduler(config.scheduler, self.blocks, self.adapters)
        eager = config.model.enforce_eager
        graph_batch = 0 if eager else config.scheduler.max_num_seqs
        cpu_loop = not eager and mux_kernels and picks.choice("decode", "loop") == "loop"
        self.runner = ModelRunner(model, self.lora, self.cache, graph_batch, cpu_loop)
        self.weights = self._weights()
        log.info("weights: %s", self.weights)  # the start-up log's quantization and decoder linears' bytes
        overlap = config.model.overlap_output
        self.overlap_output = device.type == "cuda" if overlap is None else overlap
        self._pending: list[Sequence] = []  # sequences whose last token's text waits for the next step
        self.sampler = Sampler()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()  # ("add", Sequence) | ("cancel", request_id)
        self._seqs: dict[str, Sequence] = {}  # request_id -> live sequence (engine thread only)
        self._step_lock = threading.Lock()
        self._wake = threading.Event()
        self._reads: queue.SimpleQueue = queue.SimpleQueue()  # (path, Future): disk reads for between steps
        self._running: Future | None = None  # the serving loop, while started
        self._stopping = False
        self.num_steps = 0
        self._next_expiry_check = 0.0
        self.num_generated = 0
        self.finished: Counter[str] = Counter()  # finish reason -> sequences (cancelled = client went away, ...)
        self.faults: Counter[str] = Counter()  # "step" (a failed forward or sampling) | "loop" (anywhere else)
        self._rate: deque[tuple[float, int]] = deque(maxlen=256)  # (time, tokens) per step, for tokens/s

    def _quantize(self, model, config) -> None:
        """--quantization: the decoder linears as integers (mux/model/quant.py), from the GGUF file's own 4-bit
        tensors where it has them. CPU only."""
        if config.quantization == "none":
            return
        if next(model.parameters()).device.type != "cpu":
            raise MuxError(f"--quantization {config.quantization} runs on the CPU only (CUDA: not built yet)")
        quant.quantize_model(model, config.quantization, self.base.gguf)

    def _weights(self) -> dict:
        """The quantization and the resident bytes of the decoder layers' linears (/v1/models, /admin/stats)."""
        nbytes = sum(
            m.weight_bytes if isinstance(m, PackedLinear) else m.weight.nbytes
            for n, m in self.base.model.named_modules()
            if ".layers." in n and type(m) in (PackedLinear, torch.nn.Linear)
        )
        return {"quantization": self.config.model.quantization, "decoder_linear_bytes": nbytes}

    # ---- public API -------------------------------------------------------------------------
    def submit(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        adapter: str | Path | AdapterRef | None = None,
        request_id: str | None = None,
        tenant: str | None = None,
        batch: bool = False,
    ) -> RequestStream:
        """Queue one generation. Raises InvalidRequest/InvalidAdapter/Overloaded before anything is queued.

        `adapter` is a PEFT adapter directory (validated now, on the caller's thread) or a prepared AdapterRef;
        `batch`: a batch-job line, scheduled in the room online requests leave.
        """
        params = params or SamplingParams()
        prompt_ids = self.tokenizer(prompt).input_ids if isinstance(prompt, str) else list(prompt)
        self._check_request(prompt_ids, params)
        ref = self.prepare_adapter(adapter) if isinstance(adapter, (str, Path)) else adapter
        request_id = request_id or f"req-{next(_request_ids)}"
        seq = Sequence(prompt_ids, params, ref, request_id, tenant, batch=batch)
        seq.deadline = time.monotonic() + self._timeout_s(params)
        seq.detok = Detokenizer(self.tokenizer, prompt_ids, params.stop)
        seq.stream = RequestStream(request_id, prompt_ids, ref and str(ref.path), self.cancel, self._pump)
        if ref is not None:  # queued is in use: the adapter cannot be deleted under it (until _finish)
            self.adapters.hold(ref.key)
        self._inbox.put(("add", seq))
        self._wake.set()
        return seq.stream

    def generate(
        self,
        prompts: list[str | list[int]],
        params: SamplingParams | list[SamplingParams] | None = None,
        adapters: list | None = None,
    ) -> list[Completion]:
        """Run a batch to completion; the prompts share forward passes whatever their adapters."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        adapters = adapters or [None] * len(prompts)
        streams = [self.submit(p, sp, a) for p, sp, a in zip(prompts, params_list, adapters, strict=True)]
        return [s.result() for s in streams]

    def cancel(self, request_id: str) -> None:
        self._inbox.put(("cancel", request_id))
        self._wake.set()

    def cached_adapter(self, path: str | Path) -> AdapterRef | None:
        """The ref of the adapter at `path` if the host tier holds it now (a stat and a lookup, no read: cheap
        enough for an event loop), else None."""
        return self.adapters.cached(path)

    def prepare_adapter(self, path: str | Path) -> AdapterRef:
        """Validate an adapter directory (reading it into the host tier); blocking, so call it off the loop.

        While the loop runs, a read from disk is handed to the engine's thread, which does it between two
        steps (`READS_PER_STEP` at most) with its own OpenMP team. Beside the steps, on a 2-core machine, a
        reader costs the engine more than its own CPU time: a preempted OpenMP thread stalls its whole team
        (reads at 8/s beside a decode: 127-158 tok/s on a thread, 174-185 between steps, 196-236 with none; an
        ad hoc script). End to end (`python -m bench.adapter_scaling --compare reads`, 2026-12-02): 8 adapters
        won every pair, 1,000 Zipf adapters a tie (a read now waits for the step in flight to end).
        """
        if not (self.config.lora.reads_between_steps and self._running is not None) or self.torch.is_current():
            return self.adapters.prepare(path)
        if (ref := self.cached_adapter(path)) is not None:
            return ref
        future: Future = Future()
        self._reads.put((Path(path), future))
        self._wake.set()
        while True:
            try:
                return future.result(timeout=0.5)
            except TimeoutError:
                # the loop stopped (or died) before taking it: read here, unless it has taken it after all
                if (self._running is None or self._running.done()) and future.cancel():
                    return self.adapters.prepare(path)

    def reset_prefix_cache(self) -> int:
        """Drop the prefix cache's K/V (between two steps); returns how many cached blocks were forgotten."""
        with self._step_lock:
            return self.blocks.reset_prefix_cache()

    def start(self) -> None:
        """Run the loop on the engine's torch thread; callers only submit and read streams."""
        if self._running is None:
            self._stopping = False
            self._running = self.torch.submit(self._loop)

    def stop(self) -> None:
        if self._running is not None:
            self._stopping = True
            self._wake.set()
            self._running.result()
            self._running = None

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    def stats(self) -> dict:
        now = time.monotonic()
        recent = [(t, n) for t, n in list(self._rate) if now - t <= 10.0]
        span = now - recent[0][0] if recent else 0.0
        return {
            "running": self.num_running,
            "waiting": self.num_waiting,
            "steps": self.num_steps,
            "generated_tokens": self.num_generated,
            "tokens_per_s": sum(n for _, n in recent) / span if span > 0 else 0.0,
            "kv_blocks": {
                "total": self.blocks.num_blocks,
                "free": self.blocks.num_free,
                "cached": self.blocks.num_cached,
            },
            "prefix_cache": {"queried_tokens": self.blocks.queried_tokens, "hit_tokens": self.blocks.hit_tokens},
            "finished": dict(self.finished),
            "faults": {"step": self.faults["step"], "loop": self.faults["loop"]},
            "cpu_kernels": None if self.linear_plan is None else self.linear_plan.report(),
            "weights": self.weights,
        }

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # ---- the loop ---------------------------------------------------------------------------
    def step(self) -> bool:
        """One engine iteration. Returns False when there was nothing to do."""
        with self._step_lock:
            read = self._serve_reads()
            self._drain_inbox()
            self._fail_broken_adapters()
            self._expire()
            out = self.scheduler.schedule()
            if not out.scheduled:  # idle, or waiting on adapter loads: give the loader a moment
                return self._push_pending() or self.adapters.wait_for_load(0.01) or bool(out.preempted) or read
            try:
                logits, prompt_spans = self.runner.run(out.scheduled)
                self._push_pending()  # the last step's text, while the device runs this one (overlap_output)
                for span in prompt_spans:
                    self._prompt_logprobs(span)
                self._postprocess(out, logits)
            except Exception as e:  # a failed step (forward or sampling) fails its sequences, never the engine
                log.exception("engine step failed")
                self.faults["step"] += 1
                for s in out.scheduled:
                    if s.seq.status is not Status.FINISHED:
                        self._finish(s.seq, "error", error=f"engine step failed: {e}")
                return True
            self.num_steps += 1
            self._rate.append((time.monotonic(), len(logits)))
            self.num_generated += len(logits)
            return True

    def _serve_reads(self) -> bool:
        """Do up to READS_PER_STEP of the disk reads request threads handed over; True if it did any."""
        done = False
        for _ in range(READS_PER_STEP):
            try:
                path, future = self._reads.get_nowait()
            except queue.Empty:
                break
            if not future.set_running_or_notify_cancel():  # its caller gave up and read it itself
                continue
            done = True
            try:
                future.set_result(self.adapters.prepare(path))
            except BaseException as e:  # an invalid adapter: the caller raises it
                future.set_exception(e)
        return done

    def _fail_broken_adapters(self) -> None:
        if not self.adapters.failures:
            return
        failures, self.adapters.failures = self.adapters.failures, {}
        for seq in list(self.scheduler.waiting):
            if seq.adapter is not None and seq.adapter.key in failures:
                self._finish(seq, "error", error=failures[seq.adapter.key])

    def _expire(self) -> None:
        """End sequences past their deadline (checked at most twice a second: it walks every live sequence)."""
        now = time.monotonic()
        if now < self._next_expiry_check:
            return
        self._next_expiry_check = now + 0.5
        for seq in [s for s in self._seqs.values() if s.deadline <= now]:
            timeout = self._timeout_s(seq.params)
            self._finish(seq, "timeout", error=f"the request did not finish within its {timeout:g} s deadline")

    def _timeout_s(self, params: SamplingParams) -> float:
        """The server's request_timeout_s, or the request's own shorter one."""
        return min(self.config.scheduler.request_timeout_s, params.timeout_s or math.inf)

    def _loop(self) -> None:
        while not self._stopping:
            try:
                busy = self.step()
            except Exception:  # a fault outside the forward: a loop that ended here would hang every request
                log.exception("engine loop failed; failing the live requests")
                self.faults["loop"] += 1
                self._fail_live("engine error; the request was dropped")
                busy = True
            if not busy:
                # Live sequences (waiting on a slot or a load, or with deadlines) are looked at again soon; with
                # none, only a submit, a cancel or stop can make work, and each sets _wake: an idle engine does
                # not wake 20 times a second, which on a small machine stalls whatever else runs there.
                self._wake.wait(timeout=0.05 if self._seqs else None)
                self._wake.clear()
        while self._serve_reads():  # reads handed over before the stop are still answered
            pass
        for seq in list(self._seqs.values()):
            self._finish(seq, "cancelled", error="engine stopped")

    def _fail_live(self, error: str) -> None:
        for seq in list(self._seqs.values()):
            try:
                self._finish(seq, "error", error=error)
            except Exception:
                log.exception("could not free %s", seq.request_id)
                self._seqs.pop(seq.request_id, None)

    def _pump(self) -> bool:
        """Without a started loop, a reader drives the steps (still on the torch thread)."""
        return self._running is None and self.torch.call(self.step)

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                self._seqs[item.request_id] = item
                self.scheduler.add(item)
            elif (seq := self._seqs.get(item)) is not None:
                self._finish(seq, "cancelled")

    def _prompt_logprobs(self, span) -> None:
        """Keep the chunk's prompt logprobs (positions already kept, as after a preemption, are skipped)."""
        seq = span.seq
        for pos, entry in enumerate(self.runner.prompt_logprobs(span, seq.params.prompt_logprobs), span.first):
            if pos == len(seq.prompt_lp):
                seq.prompt_lp.append(entry)

    def _postprocess(self, out: SchedulerOutput, logits: torch.Tensor) -> None:
        sampled = [s.seq for s in out.scheduled if s.sample]
        tokens, logprobs, tops = self.sampler.sample(logits, sampled)
        for s in out.scheduled:
            s.seq.num_computed += s.num_tokens
            self.blocks.commit(s.seq)
        for seq, token, logprob, top in zip(sampled, tokens, logprobs, tops, strict=True):
            if seq.status is Status.FINISHED:  # a stop string in its pending text ended it after it was scheduled
                self.sampler.forget(seq.seq_id)  # (sampling it again made its generator anew)
                continue
            self._append(seq, token, logprob, top)

    def _append(self, seq: Sequence, token: int, logprob: float, top=None) -> None:
        if not math.isfinite(logprob):  # the row's logits were not finite: the sampler did not sample it
            return self._finish(seq, "error", error="the logits are not finite (NaN or inf): cannot sample")
        p = seq.params
        if not seq.output_ids and p.prompt_logprobs is not None:  # the prompt is done: before its first token
            seq.stream.prompt_logprobs = [None, *seq.prompt_lp]
        seq.output_ids.append(token)
        if token in self.eos_ids and not p.ignore_eos:
            return self._finish(seq, "eos", TokenEvent(token, seq.detok.flush(), logprob, "eos", top=top))
        if token in p.stop_token_ids:
            return self._finish(seq, "stop", TokenEvent(token, seq.detok.flush(), logprob, "stop", top=top))
        if self.overlap_output and len(seq.output_ids) > 1 and not self._at_limit(seq):
            seq.pending = (token, logprob, top)  # its text goes out during the next step (a first token at once)
            return self._pending.append(seq)
        self._push_text(seq, token, logprob, top)

    def _push_pending(self) -> bool:
        """Detokenize and push the tokens the last step left pending; True if there were any."""
        pending, self._pending = self._pending, []
        for seq in pending:
            if seq.pending is not None:  # else it finished meanwhile, and _finish pushed it
                token, logprob, top = seq.pending
                seq.pending = None
                self._push_text(seq, token, logprob, top)
        return bool(pending)

    def _push_text(self, seq: Sequence, token: int, logprob: float, top) -> None:
        text, stopped = seq.detok.add(token)
        if stopped:
            reason = "stop"
        elif self._at_limit(seq):
            reason, text = "length", text + seq.detok.flush()
        else:
            return seq.stream.push(TokenEvent(token, text, logprob, top=top))
        self._finish(seq, reason, TokenEvent(token, text, logprob, reason, top=top))

    def _at_limit(self, seq: Sequence) -> bool:
        """Its last token ends it by length: max_tokens, or the model's context."""
        return len(seq.output_ids) >= seq.params.max_tokens or seq.num_tokens >= self.base.max_model_len

    def _finish(self, seq: Sequence, reason: str, last: TokenEvent | None = None, error: str | None = None) -> None:
        """Free the sequence's KV blocks and adapter pin, then send its last event (so a caller that has its
        answer never sees the resources still held). A token whose text was pending goes out first."""
        if seq.pending is not None:  # cancelled, timed out or failed before its last token's text was pushed
            token, logprob, top = seq.pending
            seq.pending = None
            seq.stream.push(TokenEvent(token, seq.detok.add(token)[0], logprob, top=top))
        held = seq.adapter is not None and self._seqs.get(seq.request_id) is seq
        try:
            self.scheduler.finish(seq, reason)  # releases the slot's ref first: in_use then reads the hold only
        finally:
            if held:
                self.adapters.unhold(seq.adapter.key)
        self.finished[reason] += 1
        self.sampler.forget(seq.seq_id)
        self._seqs.pop(seq.request_id, None)
        seq.stream.num_cached_tokens = seq.num_cached
        seq.stream.push(last or TokenEvent(None, "", None, reason, error))

    def _check_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        if not prompt_ids:
            raise InvalidRequest("the prompt is empty")
        vocab = self.base.model.config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise InvalidRequest(f"prompt token ids must be in [0, {vocab})")
        if any(not 0 <= t < vocab for t, _ in params.logit_bias):
            raise InvalidRequest(f"logit_bias token ids must be in [0, {vocab})")
        limit = self.base.max_model_len
        if len(prompt_ids) + params.max_tokens > limit:
            raise InvalidRequest(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                f"model's context length ({limit})"
            )
        capacity = self.blocks.num_blocks * self.blocks.block_size
        if len(prompt_ids) + params.max_tokens > capacity:
            raise InvalidRequest(f"prompt + max_tokens exceeds the KV cache capacity ({capacity} tokens)")
        if self.num_waiting + self._inbox.qsize() >= self.config.scheduler.max_waiting:
            raise Overloaded("the admission queue is full; retry later")
