"""OpenAI-compatible routes as vLLM serves them: /v1/models, /v1/completions, /v1/chat/completions (+ SSE)."""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from mux import jsonread
from mux.engine.sequence import MAX_TOP_LOGPROBS, SamplingParams
from mux.engine.stream import Completion, RequestStream, TokenEvent
from mux.errors import (
    AdapterNotFound,
    Conflict,
    DeadlineExceeded,
    InvalidAdapter,
    InvalidRequest,
    MuxError,
    NotFound,
    NotReady,
    Overloaded,
)
from mux.server.auth import Forbidden, Unauthorized
from mux.server.logprobs import Logprobs, joined
from mux.server.serving import ClientGone, client_gone


class BodyTooLarge(InvalidRequest):
    """A JSON body over MAX_JSON_BYTES (413)."""


MAX_JSON_BYTES = 4 << 20  # prompts of a whole context fit many times over


MAX_N = 16
FINISH = {"length": "length", "stop": "stop", "eos": "stop", "cancelled": "abort", "timeout": "abort", "error": "abort"}
_STATUS = [
    (Unauthorized, 401, "AuthenticationError"),
    (BodyTooLarge, 413, "BadRequestError"),
    (Forbidden, 403, "PermissionDeniedError"),
    (NotFound, 404, "NotFoundError"),
    (InvalidAdapter, 400, "BadRequestError"),
    (InvalidRequest, 400, "BadRequestError"),
    (Conflict, 409, "ConflictError"),
    (NotReady, 503, "ServiceUnavailable"),
    (Overloaded, 429, "RateLimitError"),
    (DeadlineExceeded, 504, "TimeoutError"),
]


def error_body(exc: Exception) -> tuple[int, dict]:
    """The one place MuxError maps to OpenAI-style status codes and bodies."""
    status, kind = next(((s, k) for cls, s, k in _STATUS if isinstance(exc, cls)), (500, "InternalServerError"))
    param = "model" if isinstance(exc, AdapterNotFound) else None
    return status, {"error": {"message": str(exc), "type": kind, "param": param, "code": status}}


def retry_after_headers(exc: Exception) -> dict | None:
    """`Retry-After` for an Overloaded error (every protocol's 429/503), else nothing."""
    return {"Retry-After": str(exc.retry_after)} if isinstance(exc, Overloaded) else None


def error_response(exc: Exception) -> JSONResponse:
    status, body = error_body(exc)
    headers = retry_after_headers(exc)
    return JSONResponse(body, status_code=status, headers=headers)


async def read_body(request: Request) -> bytes:
    """The body, read through MAX_JSON_BYTES (a missing Content-Length does not bypass it) and, when it came
    gzip- or deflate-encoded (tritonclient's request_compression_algorithm), decompressed through it too."""
    if int(request.headers.get("content-length") or 0) > MAX_JSON_BYTES:
        raise BodyTooLarge(f"request body over {MAX_JSON_BYTES} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_JSON_BYTES:
            raise BodyTooLarge(f"request body over {MAX_JSON_BYTES} bytes")
        chunks.append(chunk)
    return _decompressed(b"".join(chunks), request.headers.get("content-encoding", "identity"))


_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def _decompressed(raw: bytes, encoding: str) -> bytes:
    encoding = encoding.strip().lower()
    if encoding == "identity":
        return raw
    if encoding not in _WBITS:
        raise InvalidRequest(f"Content-Encoding {encoding!r} is not supported (gzip, deflate or identity)")
    d = zlib.decompressobj(_WBITS[encoding])
    try:
        out = d.decompress(raw, MAX_JSON_BYTES + 1)
    except zlib.error as e:
        raise InvalidRequest(f"the {encoding} request body cannot be decompressed: {e}") from None
    if len(out) > MAX_JSON_BYTES or d.unconsumed_tail:
        raise BodyTooLarge(f"request body over {MAX_JSON_BYTES} bytes once decompressed")
    if not d.eof:
        raise InvalidRequest(f"the {encoding} request body is truncated")
    return out


async def read_json(request: Request) -> dict:
    """The body as a JSON object, read through the byte limit and `mux.jsonread`'s rules (BadJSON: 400)."""
    body = jsonread.loads(await read_body(request), "the request body", MAX_JSON_BYTES)
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    return body


def _number(body: dict, key: str, default, kind=float, lo=None, hi=None):
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise InvalidRequest(f"`{key}` must be {'an integer' if kind is int else 'a number'}")
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidRequest(f"`{key}` must be finite")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise InvalidRequest(f"`{key}` must be in [{lo}, {hi}], got {value!s:.40}")
    return kind(value)


def sampling_params(body: dict, chat: bool = False) -> SamplingParams:
    stop = body.get("stop") or ()
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 16:
        raise InvalidRequest("`stop` must be a non-empty string or a list of at most 16 non-empty strings")
    # chat accepts OpenAI's newer `max_completion_tokens` in place of the deprecated `max_tokens`
    key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    return SamplingParams(
        max_tokens=_number(body, key, 16, int, lo=1),
        temperature=_number(body, "temperature", 1.0, lo=0, hi=2),
        top_p=_number(body, "top_p", 1.0, lo=1e-9, hi=1),
        top_k=max(0, _number(body, "top_k", 0, int, lo=-1)),  # vLLM: -1 = off
        seed=_number(body, "seed", None, int),
        stop=tuple(stop),
        stop_token_ids=tuple(_token_list(body.get("stop_token_ids") or [], "stop_token_ids")),
        ignore_eos=bool(body.get("ignore_eos", False)),
        min_p=_number(body, "min_p", 0.0, lo=0, hi=1),
        presence_penalty=_number(body, "presence_penalty", 0.0, lo=-2, hi=2),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, lo=-2, hi=2),
        repetition_penalty=_number(body, "repetition_penalty", 1.0, lo=1e-9, hi=2),
        logit_bias=_logit_bias(body.get("logit_bias")),
    )


def _logit_bias(value) -> tuple[tuple[int, float], ...]:
    """OpenAI's `{"<token id>": bias}` (JSON keys are strings), bias in [-100, 100]."""
    if value is None:
        return ()
    if not isinstance(value, dict) or len(value) > 1024:
        raise InvalidRequest("`logit_bias` must be an object of at most 1024 token ids to biases")
    out = []
    for key, bias in value.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit()):
            raise InvalidRequest(f"`logit_bias` keys must be token ids, got {key!r}")
        out.append((int(key), _number({"bias": bias}, "bias", 0.0, lo=-100, hi=100)))
    return tuple(out)


def requested_logprobs(body: dict, chat: bool) -> int | None:
    """None if the response carries no logprobs, else how many alternatives each token reports.
    Chat: `logprobs: true` and `top_logprobs` (0-20); completions: `logprobs` (0-20, vLLM's bound)."""
    if not chat:
        return _number(body, "logprobs", None, int, lo=0, hi=MAX_TOP_LOGPROBS)
    wanted = body.get("logprobs")
    if wanted is not None and not isinstance(wanted, bool):
        raise InvalidRequest("`logprobs` must be a boolean")
    top = _number(body, "top_logprobs", None, int, lo=0, hi=MAX_TOP_LOGPROBS)
    if top and not wanted:
        raise InvalidRequest("`top_logprobs` needs `logprobs: true`")
    return (top or 0) if wanted else None


# request fields whose feature is not built: refused unless absent or neutral, never silently ignored
_UNSUPPORTED = {
    "tools": lambda v: not v,
    "functions": lambda v: not v,
    "tool_choice": lambda v: v in (None, "none", "auto"),
    "function_call": lambda v: v in (None, "none", "auto"),
    "response_format": lambda v: v is None or (isinstance(v, dict) and v.get("type") == "text"),
    "best_of": lambda v: v in (None, 1),
    "use_beam_search": lambda v: not v,
    "min_tokens": lambda v: not v,
    "suffix": lambda v: not v,
    "guided_json": lambda v: v is None,
    "guided_regex": lambda v: v is None,
    "guided_choice": lambda v: v is None,
    "guided_grammar": lambda v: v is None,
    "structured_outputs": lambda v: v is None,
    "include_stop_str_in_output": lambda v: not v,  # vLLM's: the stop string is always cut
    "skip_special_tokens": lambda v: v in (None, True),  # vLLM's: special tokens never reach the text
}


def refuse_unsupported(body: dict) -> None:
    for key, neutral in _UNSUPPORTED.items():
        if key in body and not neutral(body[key]):
            raise InvalidRequest(f"`{key}` is not supported by this server (got {body[key]!r:.80})")


def _token_list(value, key: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise InvalidRequest(f"`{key}` must be a list of token ids")
    return value


class OpenAIRoutes:
    def __init__(self, state) -> None:
        self.state = state  # ServerState: engine, repository, base name

    def routes(self) -> list[Route]:
        return [
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
        ]

    def _caller(self, request: Request):
        return self.state.auth.identify(request.headers.get("authorization"))

    async def models(self, request: Request) -> Response:
        try:
            caller = self._caller(request)
        except MuxError as e:
            return error_response(e)
        now = int(time.time())
        base = self.state.base_name
        data = [
            {
                "id": base,
                "object": "model",
                "created": now,
                "owned_by": "mux",
                "root": base,
                "parent": None,
                "max_model_len": self.state.engine.base.max_model_len,
                "quantization": self.state.engine.weights["quantization"],  # and the bytes its linears take
                "decoder_linear_bytes": self.state.engine.weights["decoder_linear_bytes"],
            }
        ]
        data += [
            {
                "id": a,
                "object": "model",
                "created": now,
                "owned_by": "mux",
                "root": a,  # vLLM puts the adapter's path here: the server's directories stay private
                "parent": base,
                "max_model_len": self.state.engine.base.max_model_len,  # the base model's, as vLLM says
            }
            for a in self.state.repository.ids()
            if self.state.auth.can_use(caller, a)
        ]
        return JSONResponse({"object": "list", "data": data})

    async def completions(self, request: Request) -> Response:
        try:
            return await self.answer(self._caller(request), await read_json(request), chat=False, request=request)
        except MuxError as e:
            return error_response(e)

    async def chat(self, request: Request) -> Response:
        try:
            return await self.answer(self._caller(request), await read_json(request), chat=True, request=request)
        except MuxError as e:
            return error_response(e)

    async def answer(self, caller, body: dict, chat: bool, request: Request | None = None, batch: bool = False):
        """A completion or chat body as its route answers it (raises MuxError). A batch-job line comes without a
        request (nobody can disconnect) and is scheduled in the room online requests leave."""
        if chat:
            messages = _messages(body.get("messages"))
            tok = self.state.engine.tokenizer
            try:
                text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            except Exception as e:  # the model's own Jinja template refused these messages
                raise InvalidRequest(f"the chat template cannot render these messages: {e}") from None
            prompts = [tok(text, add_special_tokens=False).input_ids]
        else:
            prompts = self._prompts(body.get("prompt"))
        return await self._run(request, caller, body, prompts, chat, batch)

    @staticmethod
    def _prompts(prompt) -> list:
        if isinstance(prompt, str):
            return [prompt]
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            return prompt
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            return [prompt]
        if isinstance(prompt, list) and prompt and all(isinstance(p, list) for p in prompt):
            return [_token_list(p, "prompt") for p in prompt]
        raise InvalidRequest("`prompt` must be a string, a list of strings, or token ids")

    async def _run(
        self, request: Request | None, caller, body: dict, prompts: list, chat: bool, batch: bool
    ) -> Response:
        model = body.get("model") or self.state.base_name  # its type is checked by serving.submit
        refuse_unsupported(body)
        echo = bool(body.get("echo"))
        if echo and chat:
            raise InvalidRequest("`echo` is not supported for chat completions")
        stream = bool(body.get("stream"))
        if stream and batch:
            raise InvalidRequest("`stream` is not supported in a batch job")
        drop_output = echo and body.get("max_tokens") == 0  # the prompt's logprobs only (lm-eval's loglikelihood)
        if drop_output:
            if stream:
                raise InvalidRequest("`max_tokens: 0` (with `echo`) cannot stream")
            body = {**body, "max_tokens": 1}  # one token is generated, and not returned
        params = sampling_params(body, chat)
        if chat and body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
            params = replace(params, max_tokens=self._room(prompts[0]))  # vLLM: the rest of the context
        top = requested_logprobs(body, chat)
        if top:
            params = replace(params, top_logprobs=top)
        vllm_prompt = _number(body, "prompt_logprobs", None, int, lo=0, hi=MAX_TOP_LOGPROBS)
        if vllm_prompt is not None and stream:
            raise InvalidRequest("`prompt_logprobs` cannot stream")
        prompt_k = [k for k in (top if echo else None, vllm_prompt) if k is not None]  # the prompt is scored
        if prompt_k:
            params = replace(params, prompt_logprobs=max(prompt_k))
        n = _number(body, "n", 1, int, lo=1, hi=MAX_N)
        if len(prompts) * n > MAX_N * 4:
            raise InvalidRequest(f"at most {MAX_N * 4} choices per request")
        prompts = [p for p in prompts for _ in range(n)]
        seeded = params.seed is not None  # choice i of each prompt samples with seed + i
        params_list = [_with_seed(params, params.seed + i % n) if seeded else params for i in range(len(prompts))]
        serving = self.state.serving
        session = serving.session(request, body.get("user"))
        streams = await serving.submit(caller, model, prompts, params_list, session, batch=batch)
        tokenizer = self.state.engine.tokenizer
        reply = _Reply(
            meta={
                "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                "created": int(time.time()),
                "model": model,
            },
            chat=chat,
            n=n,
            logprobs=Logprobs(tokenizer, chat) if top is not None or vllm_prompt is not None else None,
            token_logprobs=top is not None,
            echo=[p if isinstance(p, str) else tokenizer.decode(p) for p in prompts] if echo else None,
            vllm_prompt=vllm_prompt is not None,
            drop_output=drop_output,
        )
        if stream:
            stream_options = body.get("stream_options") or {}
            usage = bool(isinstance(stream_options, dict) and stream_options.get("include_usage"))
            return StreamingResponse(
                self._sse(streams, reply, usage), media_type="text/event-stream", headers=serving.headers(streams)
            )
        return await self._collect(request, streams, reply)

    def _room(self, prompt_ids: list[int]) -> int:
        """Tokens left after the prompt in the context (and the KV cache); at least 1, so that a prompt too
        long is refused by the engine with its own message."""
        engine = self.state.engine
        capacity = min(engine.base.max_model_len, engine.blocks.num_blocks * engine.blocks.block_size)
        return max(1, capacity - len(prompt_ids))

    async def _collect(self, request: Request, streams: list[RequestStream], reply: _Reply) -> Response:
        try:
            results = await self.state.serving.finish(request, streams, _results(streams))
        except ClientGone:
            return client_gone()
        choices, generated = [], 0
        for i, r in enumerate(results):
            if reply.drop_output:
                r.text, r.token_ids, r.logprobs, r.top = "", [], [], []
            generated += len(r.token_ids)
            lp = None
            if reply.token_logprobs:
                lp = reply.logprobs.of(r.token_ids, r.logprobs, r.top, len(reply.echo[i]) if reply.echo else 0)
                if reply.echo:
                    lp = joined(reply.logprobs.prompt(r.prompt_token_ids, r.prompt_logprobs), lp)
            choice = {"index": i, "logprobs": lp, "finish_reason": FINISH[r.finish_reason], "stop_reason": None}
            if reply.chat:
                choice["message"] = {"role": "assistant", "content": r.text}
            else:
                choice["text"] = (reply.echo[i] if reply.echo else "") + r.text
                if reply.vllm_prompt:
                    choice["prompt_logprobs"] = reply.logprobs.vllm_prompt(r.prompt_token_ids, r.prompt_logprobs)
            choices.append(choice)
        usage = _usage(streams[:: reply.n], generated)
        body = {**reply.meta, "object": "chat.completion" if reply.chat else "text_completion", "choices": choices}
        if reply.chat and reply.vllm_prompt:  # vLLM: one list for the request's prompt, beside the choices
            body["prompt_logprobs"] = reply.logprobs.vllm_prompt(
                results[0].prompt_token_ids, results[0].prompt_logprobs
            )
        return JSONResponse({**body, "usage": usage}, headers=self.state.serving.headers(streams))

    async def _sse(self, streams, reply: _Reply, include_usage: bool) -> AsyncIterator[str]:
        meta, chat, n = reply.meta, reply.chat, reply.n
        logprobs = reply.logprobs if reply.token_logprobs else None
        obj = "chat.completion.chunk" if chat else "text_completion"
        counts = [0] * len(streams)
        offsets = [0] * len(streams)  # completions' text_offset: where the next token's text starts
        echoed = [not reply.echo] * len(streams)
        try:
            if chat:
                for i in range(len(streams)):
                    yield _event(
                        {
                            **meta,
                            "object": obj,
                            "choices": [
                                {
                                    "index": i,
                                    "delta": {"role": "assistant", "content": ""},
                                    "logprobs": None,
                                    "finish_reason": None,
                                }
                            ],
                        }
                    )
            interval = self.state.stream_interval
            pending: list[list[TokenEvent]] = [[] for _ in streams]  # per choice: events not sent yet
            sent = [0] * len(streams)  # per choice: tokens sent
            async for i, ev in _merged(streams):  # n > 1: choices stream side by side, as they are generated
                if not echoed[i]:  # echo: the prompt is the choice's first chunk
                    echoed[i], ids = True, streams[i].prompt_ids
                    lp = logprobs and logprobs.prompt(ids, streams[i].prompt_logprobs or [None] * len(ids))
                    offsets[i] = len(reply.echo[i])
                    choice = {"index": i, "text": reply.echo[i], "logprobs": lp, "finish_reason": None}
                    yield _event({**meta, "object": obj, "choices": [choice], "usage": None})
                pending[i].append(ev)
                if ev.token_id is not None:
                    counts[i] += 1
                if ev.finish_reason is None and sent[i] and counts[i] - sent[i] < interval:
                    continue  # stream interval: hold tokens back until `interval` are due (the first goes at once)
                events = pending[i]
                tokens = [e for e in events if e.token_id is not None]
                text = "".join(e.text for e in events)
                finish = FINISH[ev.finish_reason] if ev.finish_reason else None
                lp = None
                if logprobs is not None and tokens:  # a chunk for each token, even if no text yet
                    ids = [e.token_id for e in tokens]
                    lp = logprobs.of(ids, [e.logprob for e in tokens], [e.top for e in tokens], offsets[i])
                    offsets[i] += sum(len(logprobs.text(t)) for t in ids)
                elif not text and finish is None:
                    continue  # no text yet (a character split across tokens): these go with the next chunk
                pending[i], sent[i] = [], counts[i]
                part = {"delta": {"content": text}} if chat else {"text": text}
                yield _event(
                    {
                        **meta,
                        "object": obj,
                        "choices": [{"index": i, **part, "logprobs": lp, "finish_reason": finish}],
                        "usage": None,
                    }
                )
            if include_usage:
                yield _event({**meta, "object": obj, "choices": [], "usage": _usage(streams[::n], sum(counts))})
            yield "data: [DONE]\n\n"
        except MuxError as e:  # the stream already said 200: the error travels as an event
            yield _event(error_body(e)[1])
            yield "data: [DONE]\n\n"
        finally:  # client gone or done: cancel whatever still runs (frees KV and adapter pins)
            self.state.serving.done(streams)


async def _results(streams: list[RequestStream]) -> list[Completion]:
    return [await s.aresult() for s in streams]


@dataclass(frozen=True, slots=True)
class _Reply:
    """How one request's response is shaped."""

    meta: dict  # id, created, model
    chat: bool
    n: int  # choices per prompt
    logprobs: Logprobs | None  # the formatter, when any logprobs are returned
    token_logprobs: bool  # `logprobs` (chat: with `top_logprobs`) for the generated tokens
    echo: list[str] | None  # completions `echo`: each choice's prompt text
    vllm_prompt: bool  # vLLM's `prompt_logprobs`
    drop_output: bool  # `echo` with `max_tokens: 0`: the one token generated is not returned


ROLES = ("system", "developer", "user", "assistant", "tool")


def _messages(messages) -> list[dict]:
    """OpenAI chat messages as the chat template expects them: a role it knows and text content."""
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise InvalidRequest("`messages` must be a non-empty list of {role, content} objects")
    out = []
    for m in messages:
        if m.get("role") not in ROLES:
            raise InvalidRequest(f"each message needs a `role` in {', '.join(ROLES)}")
        content = m.get("content")
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
            content = "".join(str(p.get("text", "")) for p in content)  # text parts, as the SDK may send
        if not isinstance(content, (str, type(None))):
            raise InvalidRequest("only text message content is supported")
        out.append({"role": m["role"], "content": content or ""})
    return out


async def _merged(streams: list[RequestStream]) -> AsyncIterator[tuple[int, TokenEvent]]:
    """(choice index, event) from every stream in the order events arrive. A stream's error is raised here;
    closing the generator (the client went away) stops the readers."""
    queue: asyncio.Queue = asyncio.Queue()

    async def read(i: int, stream: RequestStream) -> None:
        try:
            async for event in stream:
                queue.put_nowait((i, event, None))
        except MuxError as e:
            queue.put_nowait((i, None, e))
        queue.put_nowait((i, None, None))  # this stream is done

    readers = [asyncio.create_task(read(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, event, error = await queue.get()
            if error is not None:
                raise error
            if event is None:
                remaining -= 1
                continue
            yield i, event
    finally:
        for reader in readers:
            reader.cancel()


def _usage(first_of_each_prompt: list[RequestStream], completion: int) -> dict:
    prompt = sum(len(s.prompt_ids) for s in first_of_each_prompt)
    cached = sum(s.num_cached_tokens for s in first_of_each_prompt)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def _with_seed(params: SamplingParams, seed: int) -> SamplingParams:
    return replace(params, seed=(seed + (1 << 63)) % (1 << 64) - (1 << 63))  # seed + i wraps within int64


def _event(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
