"""LoRAX wire format on a real `mux serve`: the exact requests `lorax-client` sends, parsed by its own rules.

lorax-client pins an older huggingface-hub than transformers needs, so it is not installed: its request body
(`Request(...).dict(by_alias=True)`: every parameter key, nulls included) and its response models are copied
here from predibase/lorax clients/python/lorax/{client,types}.py.
"""

from __future__ import annotations

import json
import shutil
from enum import StrEnum

import httpx
import pytest
from pydantic import BaseModel, ValidationError

from conftest import run_server, write_policy

KEYS = {"admin": "admin-secret", "acme": "acme-secret", "beta": "beta-secret"}
ACME = {"Authorization": f"Bearer {KEYS['acme']}"}


# -- lorax-client's response models (types.py); pydantic: Optional without a default is still required --
class FinishReason(StrEnum):
    Length = "length"
    EndOfSequenceToken = "eos_token"
    StopSequence = "stop_sequence"


class InputToken(BaseModel):
    id: int
    text: str
    logprob: float | None = None


class Token(BaseModel):
    id: int
    text: str
    logprob: float
    special: bool
    skipped: bool
    alternative_tokens: list | None = None


class Details(BaseModel):
    finish_reason: FinishReason
    prompt_tokens: int
    generated_tokens: int
    skipped_tokens: int
    seed: int | None = None
    prefill: list[InputToken]
    tokens: list[Token]
    best_of_sequences: list | None = None


class Response(BaseModel):
    generated_text: str
    details: Details | None = None


class StreamDetails(BaseModel):
    finish_reason: FinishReason
    prompt_tokens: int
    generated_tokens: int
    seed: int | None = None


class StreamResponse(BaseModel):
    token: Token
    generated_text: str | None = None
    details: StreamDetails | None = None


def client_request(prompt: str, stream: bool, **given) -> dict:
    """`Client.generate` / `generate_stream`'s body: every key, in the client's order, defaults included."""
    parameters = {
        "adapter_id": None,
        "adapter_source": None,
        "merged_adapters": None,
        "api_token": None,
        "do_sample": False,
        "max_new_tokens": None,
        "ignore_eos_token": False,
        "repetition_penalty": None,
        "return_full_text": False,
        "stop": [],
        "seed": None,
        "temperature": None,
        "top_k": None,
        "top_p": None,
        "truncate": None,
        "typical_p": None,
        "best_of": None,
        "watermark": False,
        "details": True,
        "decoder_input_details": False,
        "return_k_alternatives": None,
        "response_format": None,
    }
    assert set(given) <= set(parameters)
    return {"inputs": prompt, "parameters": {**parameters, **given}, "stream": stream}


def generate(base: str, body: dict, path: str = "/", headers=ACME) -> Response:
    """Client.generate: JSON list at `/` (payload[0]); non-200 -> the error payload."""
    r = httpx.post(f"{base}{path}", json=body, headers=headers, timeout=60)
    payload = r.json()
    assert r.status_code == 200, payload
    return Response(**(payload[0] if path == "/" else payload))


def generate_stream(base: str, body: dict, path: str = "/", headers=ACME) -> list[StreamResponse | dict]:
    """Client.generate_stream's parsing: `data:` lines of JSON (a [DONE] would raise), errors as dicts."""
    out: list[StreamResponse | dict] = []
    with httpx.stream("POST", f"{base}{path}", json=body, headers=headers, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for payload in r.iter_lines():
            if payload.startswith("data:"):
                obj = json.loads(payload.lstrip("data:").rstrip("/n"))  # noqa: B005 (the client's own line)
                try:
                    out.append(StreamResponse(**obj))
                except ValidationError:
                    out.append(obj)
    return out


def error(base: str, body, path: str = "/", headers=ACME) -> tuple[int, dict]:
    r = httpx.post(f"{base}{path}", content=body if isinstance(body, bytes) else json.dumps(body), headers=headers)
    return r.status_code, r.json()


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_dir, tiny_adapters):
    root = tmp_path_factory.mktemp("repo")
    for tenant, name, src in [("acme", "attn", "r4-attn"), ("beta", "mlp", "r8-mlp")]:
        shutil.copytree(tiny_adapters[src], root / tenant / name)
    policy = tmp_path_factory.mktemp("policy") / "policy.toml"
    write_policy(policy, KEYS, extra={"beta": "tokens_per_minute = 1"})
    with run_server(tiny_dir, root, "--policy", str(policy), "--max-loras", "2") as base:
        yield base


def openai_text(base: str, model: str, prompt: str, max_tokens: int) -> str:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    r = httpx.post(f"{base}/v1/completions", json=body, headers=ACME, timeout=60)
    return r.json()["choices"][0]["text"]


def test_compat_generate_is_a_list_and_equals_openai(server):
    for adapter in ("acme/attn", "attn", None, ""):  # plain name: the caller's own; null or "": the base model
        r = generate(server, client_request("Hello world", False, adapter_id=adapter, max_new_tokens=6))
        model = "acme/attn" if adapter else "tiny"
        assert r.generated_text == openai_text(server, model, "Hello world", 6) != ""
        d = r.details
        assert d.finish_reason == FinishReason.Length and d.generated_tokens == len(d.tokens) == 6
        assert d.prompt_tokens > 0 and d.skipped_tokens == 0 and d.seed is None and d.prefill == []
        assert "".join(t.text for t in d.tokens) == r.generated_text
        assert all(t.logprob <= 0 and not t.skipped for t in d.tokens)


def test_compat_stream_has_no_done_and_ends_with_details(server):
    events = generate_stream(server, client_request("Hello world", True, adapter_id="acme/attn", max_new_tokens=6))
    assert all(isinstance(e, StreamResponse) for e in events) and len(events) == 6
    assert all(e.generated_text is None and e.details is None for e in events[:-1])
    last = events[-1]
    assert last.generated_text == "".join(e.token.text for e in events) == openai_text(server, "attn", "Hello world", 6)
    assert last.details.finish_reason == FinishReason.Length and last.details.generated_tokens == 6


def test_generate_routes_and_parameters(server):
    body = client_request("Hello world", False, adapter_id="acme/attn", max_new_tokens=6, return_full_text=True)
    r = generate(server, body, "/generate")  # a bare object
    assert r.generated_text == "Hello world" + openai_text(server, "attn", "Hello world", 6)
    events = generate_stream(server, client_request("Hello world", False, max_new_tokens=6), "/generate_stream")
    assert events[-1].generated_text == openai_text(server, "tiny", "Hello world", 6)
    # null max_new_tokens: TGI's default of 20
    r = generate(server, client_request("Hello world", False, ignore_eos_token=True))
    assert r.details.generated_tokens == 20
    # a stop sequence from the greedy text ends it early
    stop = next(t.text for t in r.details.tokens[2:] if t.text.strip())
    r = generate(server, client_request("Hello world", False, stop=[stop], ignore_eos_token=True))
    assert r.details.finish_reason == FinishReason.StopSequence and stop not in r.generated_text
    # sampling with a seed repeats and reports the seed
    body = client_request("Hello world", False, do_sample=True, temperature=0.9, top_k=20, seed=7, max_new_tokens=6)
    a, b = generate(server, body), generate(server, body)
    assert a.generated_text == b.generated_text and a.details.seed == 7


def test_penalties_reach_the_sampling_params():
    from mux.server.lorax import parse

    body = client_request("Hi", False, repetition_penalty=1.3)
    body["parameters"] |= {"frequency_penalty": 0.5, "presence_penalty": -0.5}  # LoRAX's REST API, not its client
    params = parse(body).params
    assert (params.repetition_penalty, params.frequency_penalty, params.presence_penalty) == (1.3, 0.5, -0.5)
    assert parse(client_request("Hi", False)).params.repetition_penalty == 1.0  # null: off


def test_return_k_alternatives_and_info(server):
    body = client_request("Hello world", False, details=True, max_new_tokens=4, return_k_alternatives=2)
    tokens = generate(server, body).details.tokens
    for t in tokens:
        assert [a["id"] for a in t.alternative_tokens][:1] == [t.id]  # greedy: the best is the one chosen
        assert len(t.alternative_tokens) == 2 and t.alternative_tokens[0]["logprob"] == pytest.approx(t.logprob)
    plain = generate(server, client_request("Hello world", False, details=True, max_new_tokens=2))
    assert all(t.alternative_tokens is None for t in plain.details.tokens)
    info = httpx.get(f"{server}/info", headers=ACME).json()
    assert info["model_id"] == "tiny" and info["max_total_tokens"] == 512 and info["model_device_type"] == "cpu"
    assert info["max_input_length"] == 511 and info["model_dtype"] == "torch.float32" and info["version"]


def test_decoder_input_details_give_the_prompts_logprobs(server):
    body = client_request("Hello world, how are you", False, details=True, decoder_input_details=True, max_new_tokens=2)
    prefill = generate(server, body).details.prefill
    assert len(prefill) > 3 and prefill[0].logprob is None and all(t.logprob < 0 for t in prefill[1:])
    assert "".join(t.text for t in prefill) == "Hello world, how are you"
    assert (
        generate(server, {**body, "parameters": {**body["parameters"], "decoder_input_details": False}}).details.prefill
        == []
    )
    stream = client_request("Hi", True, details=True, decoder_input_details=True)
    status, err = error(server, stream)
    assert status == 422 and "decoder_input_details" in err["error"]


def test_errors(server):
    status, body = error(server, client_request("Hi", False, adapter_id="acme/nope"))
    assert status == 424 and body["error_type"] == "generation" and "acme/nope" in body["error"]
    status, body = error(server, client_request("Hi", False, adapter_id="beta/mlp"))  # another tenant's: absent
    assert status == 424 and body["error_type"] == "generation"
    status, body = error(server, client_request("Hi", False, adapter_id="acme/attn", adapter_source="hub"))
    assert status == 422 and body["error_type"] == "validation" and "adapter_source" in body["error"]
    for bad in (
        {"repetition_penalty": 5.0},
        {"return_k_alternatives": 21},
        {"return_k_alternatives": 0},
        {"best_of": 2},
        {"max_new_tokens": 0},
        {"top_p": 0},
        {"stop": "x"},
        {"merged_adapters": {"ids": ["a"], "weights": [1.0], "density": 1.0}},
    ):
        status, body = error(server, client_request("Hi", False, **bad))
        assert status == 422 and body["error_type"] == "validation", (bad, body)
    for raw in (b"{nope", json.dumps({"inputs": ""}).encode(), json.dumps({"inputs": "Hi", "stream": "yes"}).encode()):
        status, body = error(server, raw)
        assert status == 422 and body["error_type"] == "validation"
    assert error(server, client_request("Hi", False), headers={})[0] == 401  # the same keys as everywhere
    beta = {"Authorization": f"Bearer {KEYS['beta']}"}  # 1 token per minute: the second request is refused
    generate(server, client_request("Hi", False, adapter_id="mlp", max_new_tokens=2), headers=beta)
    r = httpx.post(server, json=client_request("Hi", False, max_new_tokens=2), headers=beta)
    assert r.status_code == 429 and r.json()["error_type"] == "overloaded" and int(r.headers["retry-after"]) >= 1
    assert httpx.get(f"{server}/").status_code == 405  # GET / is not served
