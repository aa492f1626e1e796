"""LoRAX / TGI-style REST: `POST /` (what `lorax-client` calls), `/generate`, `/generate_stream`.

`parameters.adapter_id` names the adapter (`<tenant>/<name>`; null or "" = the base model). Only adapters in
mux's own repository are served: `adapter_source` must be null or "local". Unsupported features (merged adapters,
penalties, watermark, best_of > 1, ...) are refused with 422 rather than ignored; `api_token` (a hub token) is
ignored: mux keys go in the Authorization header. Streams are `data:<json>` events, one per token, with no
`[DONE]` (lorax-client would fail to parse it).
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from mux import __version__
from mux.engine.sequence import MAX_TOP_LOGPROBS, SamplingParams
from mux.engine.stream import RequestStream, TokenEvent
from mux.errors import DeadlineExceeded, InvalidRequest, MuxError, NotReady, Overloaded
from mux.server.auth import Forbidden, Unauthorized
from mux.server.logprobs import Logprobs
from mux.server.openai import BodyTooLarge, read_json, retry_after_headers
from mux.server.serving import ClientGone, InternalError, client_gone

DEFAULT_MAX_NEW_TOKENS = 20  # TGI's default when `max_new_tokens` is null
FINISH = {"length": "length", "eos": "eos_token", "stop": "stop_sequence"}
_STATUS = [
    (Unauthorized, 401, "authentication", ""),
    (Forbidden, 403, "authentication", ""),
    (BodyTooLarge, 413, "validation", "Input validation error: "),
    (InvalidRequest, 422, "validation", "Input validation error: "),
    (NotReady, 503, "overloaded", "Model is not ready: "),
    (Overloaded, 429, "overloaded", "Model is overloaded: "),
    (DeadlineExceeded, 504, "incomplete_generation", "Request failed during generation: "),
    (InternalError, 500, "internal", ""),
]
# keys lorax-client always sends; refused unless null/false or neutral
_UNSUPPORTED = ("merged_adapters", "response_format", "truncate")
_UNSUPPORTED_FLAGS = ("watermark", "apply_chat_template")
_NEUTRAL = {"typical_p": 1, "best_of": 1}
MAX_STOP = 16


def lorax_error_body(exc: Exception) -> tuple[int, dict]:
    """MuxError -> (status, LoRAX's `{"error", "error_type"}`). Anything unlisted — an adapter that cannot be
    found or loaded, a failure while generating — is LoRAX's 424 "generation"."""
    status, kind, prefix = next(
        ((s, k, p) for cls, s, k, p in _STATUS if isinstance(exc, cls)),
        (424, "generation", "Request failed during generation: "),
    )
    return status, {"error": prefix + str(exc), "error_type": kind}


def lorax_error(exc: Exception) -> JSONResponse:
    status, body = lorax_error_body(exc)
    return JSONResponse(body, status_code=status, headers=retry_after_headers(exc))


@dataclass(frozen=True, slots=True)
class Job:
    """One parsed request."""

    inputs: str
    adapter: str | None  # adapter id; None = base model
    params: SamplingParams
    details: bool
    full_text: bool  # return_full_text: the prompt precedes the generated text
    prefill: bool  # decoder_input_details: details.prefill holds the prompt's tokens and logprobs


def parse(body: dict) -> Job:
    inputs = body.get("inputs")
    if not isinstance(inputs, str) or not inputs:
        raise InvalidRequest("`inputs` must be a non-empty string")
    p = body.get("parameters") or {}
    if not isinstance(p, dict):
        raise InvalidRequest("`parameters` must be an object")
    if p.get("adapter_source") not in (None, "local"):
        raise InvalidRequest(
            f"adapter_source `{p['adapter_source']}` is not supported: mux serves only the adapters in its own "
            'repository (adapter_source null or "local", adapter_id `<tenant>/<name>`)'
        )
    adapter = p.get("adapter_id") or None
    if adapter is not None and not isinstance(adapter, str):
        raise InvalidRequest("`adapter_id` must be a string")
    for key in _UNSUPPORTED:
        if p.get(key) is not None:
            raise InvalidRequest(f"`{key}` is not supported")
    for key in _UNSUPPORTED_FLAGS:
        if p.get(key):
            raise InvalidRequest(f"`{key}` is not supported")
    for key, neutral in _NEUTRAL.items():
        if p.get(key) not in (None, neutral):
            raise InvalidRequest(f"`{key}` is not supported (only null or {neutral})")
    stop = p.get("stop") or []
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > MAX_STOP:
        raise InvalidRequest(f"`stop` must be a list of at most {MAX_STOP} non-empty strings")
    temperature = _number(p, "temperature", float, lo=0)
    top_k = _number(p, "top_k", int, lo=1)
    top_p = _number(p, "top_p", float, lo=0, hi=1)
    # TGI: greedy unless do_sample or a sampling setting is given
    sampling = bool(p.get("do_sample")) or temperature not in (None, 1) or top_k is not None or top_p is not None
    params = SamplingParams(
        max_tokens=_number(p, "max_new_tokens", int, lo=1) or DEFAULT_MAX_NEW_TOKENS,
        temperature=(1.0 if temperature is None else temperature) if sampling else 0.0,
        top_p=1.0 if top_p is None else top_p,  # SamplingParams refuses 0
        top_k=top_k or 0,
        seed=_number(p, "seed", int, lo=0),
        stop=tuple(stop),
        ignore_eos=bool(p.get("ignore_eos_token")),
        repetition_penalty=_number(p, "repetition_penalty", float, lo=1e-9, hi=2) or 1.0,
        frequency_penalty=_number(p, "frequency_penalty", float, lo=-2, hi=2) or 0.0,
        presence_penalty=_number(p, "presence_penalty", float, lo=-2, hi=2) or 0.0,
        top_logprobs=_number(p, "return_k_alternatives", int, lo=1, hi=MAX_TOP_LOGPROBS) or 0,
    )
    prefill = bool(p.get("decoder_input_details")) and bool(p.get("details"))
    if prefill:
        params = replace(params, prompt_logprobs=0)
    return Job(inputs, adapter, params, bool(p.get("details")), bool(p.get("return_full_text")), prefill)


def _number(p: dict, key: str, kind, lo=None, hi=None):
    value = p.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise InvalidRequest(f"`{key}` must be {'an integer' if kind is int else 'a number'}")
    if not _finite(value) or (lo is not None and value < lo) or (hi is not None and value > hi):
        raise InvalidRequest(f"`{key}` must be in [{lo}, {hi if hi is not None else 'inf'}], got {value!s:.40}")
    return kind(value)


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer of hundreds of digits: no float holds it
        return False


class LoraxRoutes:
    def __init__(self, state) -> None:
        self.state = state  # ServerState: engine, auth, serving
        self._special: frozenset[int] | None = None
        self._texts: Logprobs | None = None  # each token's own text, kept (bounded by the vocabulary)

    def routes(self) -> list[Route]:
        return [
            Route("/", self.compat, methods=["POST"]),  # GET / stays unserved (405)
            Route("/generate", self.generate, methods=["POST"]),
            Route("/generate_stream", self.generate_stream, methods=["POST"]),
            Route("/info", self.info, methods=["GET"]),
        ]

    async def info(self, request: Request) -> Response:
        """LoRAX's router info: the model and the limits requests are checked against."""
        engine = self.state.engine
        weights = next(engine.base.model.parameters())
        limit = engine.base.max_model_len
        sched = engine.config.scheduler
        return JSONResponse(
            {
                "model_id": engine.base.name,
                "model_sha": None,
                "model_dtype": str(weights.dtype),
                "model_device_type": weights.device.type,
                "model_pipeline_tag": None,
                "max_concurrent_requests": sched.max_waiting,
                "max_best_of": 1,
                "max_stop_sequences": MAX_STOP,
                "max_input_length": limit - 1,
                "max_total_tokens": limit,
                "waiting_served_ratio": 1.0,
                "max_batch_total_tokens": engine.blocks.num_blocks * engine.blocks.block_size,
                "max_waiting_tokens": sched.max_num_batched_tokens,
                "validation_workers": 1,
                "version": __version__,
                "sha": None,
                "docker_label": None,
                "request_logger_url": None,
            }
        )

    async def compat(self, request: Request) -> Response:
        """`stream` in the body picks SSE or a one-element JSON list."""
        return await self._handle(request, stream=None)

    async def generate(self, request: Request) -> Response:
        return await self._handle(request, stream=False)

    async def generate_stream(self, request: Request) -> Response:
        return await self._handle(request, stream=True)

    async def _handle(self, request: Request, stream: bool | None) -> Response:
        try:
            caller = self.state.auth.identify(request.headers.get("authorization"))
            body = await read_json(request)
            compat = stream is None
            if compat:
                stream = body.get("stream", False)
                if not isinstance(stream, bool):
                    raise InvalidRequest("`stream` must be a boolean")
            job = parse(body)
            if stream and job.prefill:
                raise InvalidRequest("`decoder_input_details` == true is not supported when streaming tokens")
            serving = self.state.serving
            streams = await serving.submit(caller, job.adapter, [job.inputs], job.params, serving.session(request))
        except MuxError as e:
            return lorax_error(e)
        served = serving.headers(streams)
        if stream:
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **served}
            return StreamingResponse(self._sse(job, streams), media_type="text/event-stream", headers=headers)
        try:
            events = await self.state.serving.finish(request, streams, _events(streams[0]))
        except ClientGone:
            return client_gone()
        except MuxError as e:  # a deadline is 504, any other failure while generating 424
            return lorax_error(e)
        last = events[-1]
        if last.token_id is None:  # cancelled before it finished
            return JSONResponse({"error": "Incomplete generation", "error_type": "incomplete_generation"}, 500)
        result: dict = {"generated_text": self._text(job, events)}
        if job.details:
            tokens = [self._token(ev) for ev in events]
            result["details"] = {
                **self._stream_details(job, streams[0], last, len(tokens)),
                "skipped_tokens": 0,
                "prefill": self._prefill(streams[0]) if job.prefill else [],
                "tokens": tokens,
            }
        return JSONResponse([result] if compat else result, headers=served)

    async def _sse(self, job: Job, streams: list[RequestStream]) -> AsyncIterator[str]:
        """`data:{"token", "generated_text": null, "details": null}` per token; the last one carries both."""
        events: list[TokenEvent] = []
        try:
            async for ev in streams[0]:
                if ev.token_id is None:  # cancelled before it finished
                    yield _event({"error": "Incomplete generation", "error_type": "incomplete_generation"})
                    return
                events.append(ev)
                obj = {"token": self._token(ev), "generated_text": None, "details": None}
                if ev.finish_reason is not None:
                    obj["generated_text"] = self._text(job, events)
                    if job.details:
                        obj["details"] = self._stream_details(job, streams[0], ev, len(events))
                yield _event(obj)
        except MuxError as e:  # the stream already said 200: the error travels as an event
            yield _event(lorax_error_body(e)[1])
        finally:  # client gone or done: cancel whatever still runs
            self.state.serving.done(streams)

    def _prefill(self, stream: RequestStream) -> list[dict]:
        """The prompt's tokens with the logprob of each given those before it (none for the first)."""
        entries = stream.prompt_logprobs or [None] * len(stream.prompt_ids)
        return [
            {"id": t, "text": self._token_text(t), "logprob": None if e is None else e.logprob}
            for t, e in zip(stream.prompt_ids, entries, strict=True)
        ]

    def _token_text(self, token_id: int) -> str:
        if self._texts is None:
            self._texts = Logprobs(self.state.engine.tokenizer, chat=False)
        return self._texts.text(token_id)

    def _token(self, ev: TokenEvent) -> dict:
        if self._special is None:
            self._special = frozenset(self.state.engine.tokenizer.all_special_ids)
        special = ev.token_id in self._special
        token = {"id": ev.token_id, "text": ev.text, "logprob": ev.logprob, "special": special, "skipped": False}
        if ev.top is not None:  # return_k_alternatives
            token["alternative_tokens"] = [{"id": t, "text": self._token_text(t), "logprob": lp} for t, lp in ev.top]
        return token

    @staticmethod
    def _text(job: Job, events: list[TokenEvent]) -> str:
        text = "".join(ev.text for ev in events)
        return job.inputs + text if job.full_text else text

    @staticmethod
    def _stream_details(job: Job, stream: RequestStream, last: TokenEvent, generated: int) -> dict:
        return {
            "finish_reason": FINISH[last.finish_reason],
            "prompt_tokens": len(stream.prompt_ids),
            "generated_tokens": generated,
            "seed": job.params.seed if not job.params.greedy else None,
        }


def _event(obj: dict) -> str:
    return f"data:{json.dumps(obj, ensure_ascii=False)}\n\n"  # axum's framing: no space after the colon


async def _events(stream: RequestStream) -> list[TokenEvent]:
    return [ev async for ev in stream]
