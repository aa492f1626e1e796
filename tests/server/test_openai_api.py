"""A real `mux serve` (uvicorn on loopback) driven by the real openai SDK; outputs equal the engine's."""

from __future__ import annotations

import concurrent.futures
import json
import shutil
import urllib.request

import openai
import pytest

from conftest import make_engine, run_server
from mux.engine.sequence import SamplingParams


@pytest.fixture(scope="module")
def repo(tmp_path_factory, tiny_adapters):
    root = tmp_path_factory.mktemp("adapters")
    for tenant, name, src in [("acme", "attn", "r4-attn"), ("acme", "all", "r16-all"), ("beta", "mlp", "r8-mlp")]:
        shutil.copytree(tiny_adapters[src], root / tenant / name)
    return root


@pytest.fixture(scope="module")
def server(tiny_dir, repo, tiny_adapters):
    allowed = next(iter(tiny_adapters.values())).parent
    with run_server(tiny_dir, repo, "--max-loras", "2", "--allowed-lora-dir", str(allowed)) as base:
        yield base


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def engine(tiny_dir):
    return make_engine(tiny_dir, max_loras=2, max_lora_rank=16)


def expected(engine, repo, prompt, adapter, max_tokens=8):
    path = repo / adapter if adapter else None
    return engine.generate([prompt], SamplingParams(max_tokens=max_tokens, temperature=0), [path])[0]


def test_models_lists_base_and_adapters(client):
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"tiny", "acme/attn", "acme/all", "beta/mlp"}
    assert models["acme/attn"].model_extra["parent"] == "tiny"
    assert models["acme/attn"].model_extra["max_model_len"] == models["tiny"].model_extra["max_model_len"] == 512
    assert models["tiny"].model_extra["quantization"] == "none" and models["tiny"].model_extra["decoder_linear_bytes"]


def test_completion_equals_engine(client, engine, repo):
    for model, adapter in [("tiny", None), ("acme/attn", "acme/attn"), ("beta/mlp", "beta/mlp")]:
        r = client.completions.create(model=model, prompt="Hello world", max_tokens=8, temperature=0)
        ref = expected(engine, repo, "Hello world", adapter)
        assert r.choices[0].text == ref.text and r.model == model
        assert r.usage.completion_tokens == len(ref.token_ids)
        assert r.usage.prompt_tokens == len(ref.prompt_token_ids)


def test_streaming_completion(client, engine, repo):
    chunks = list(
        client.completions.create(
            model="acme/all",
            prompt="Hello world",
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == expected(engine, repo, "Hello world", "acme/all").text
    assert chunks[-1].usage.completion_tokens == 8 and chunks[-2].choices[0].finish_reason == "length"


def test_chat_and_chat_stream(client, engine, repo):
    messages = [{"role": "user", "content": "Say hi"}]
    r = client.chat.completions.create(model="acme/attn", messages=messages, max_tokens=6, temperature=0)
    tok = engine.tokenizer
    ids = tok(
        tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), add_special_tokens=False
    ).input_ids
    ref = expected(engine, repo, ids, "acme/attn", max_tokens=6)
    assert r.choices[0].message.content == ref.text and r.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(
        model="acme/attn", messages=messages, max_tokens=6, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == ref.text


def test_usage_reports_prompt_tokens_served_from_the_prefix_cache(client, engine, repo):
    """A repeated long prompt starts after its cached blocks: the SDK reads `cached_tokens`; the text is the same."""
    prompt = "You are a terse assistant who answers in one line. " * 3 + "What is two plus two?"
    first = client.completions.create(model="acme/all", prompt=prompt, max_tokens=6, temperature=0)
    chunks = list(
        client.completions.create(
            model="acme/all",
            prompt=prompt,
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    n = first.usage.prompt_tokens
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == (n - 1) // 16 * 16 > 0
    assert "".join(c.choices[0].text for c in chunks if c.choices) == first.choices[0].text
    assert first.choices[0].text == expected(engine, repo, prompt, "acme/all", max_tokens=6).text
    other = client.completions.create(model="acme/attn", prompt=prompt, max_tokens=6, temperature=0)
    assert other.usage.prompt_tokens_details.cached_tokens == 0  # another adapter's K/V is not this one's


def test_a_server_without_prefix_caching_reuses_nothing(tiny_dir, repo):
    prompt = "You are a terse assistant who answers in one line. " * 3 + "What is two plus two?"
    with run_server(tiny_dir, repo, "--no-enable-prefix-caching") as base:
        plain = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        for _ in range(2):
            r = plain.completions.create(model="acme/all", prompt=prompt, max_tokens=2, temperature=0)
            assert r.usage.prompt_tokens_details.cached_tokens == 0


def test_unknown_model_is_404_never_base(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="acme/nope", prompt="Hi", max_tokens=2)
    assert "does not exist" in str(e.value)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="../../etc", prompt="Hi", max_tokens=2)


def test_bad_requests_are_400(client, server):
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="Hi", max_tokens=2, temperature=-1)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="Hi", max_tokens=100000)
    # a body declared larger than the limit is refused before it is read (the client sends only a little)
    import http.client

    host, port = server.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.putrequest("POST", "/v1/completions")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(1 << 30))
    conn.endheaders(b"{}")
    resp = conn.getresponse()
    assert resp.status == 413 and "request body over" in json.loads(resp.read())["error"]["message"]
    conn.close()
    req = urllib.request.Request(f"{server}/v1/completions", data=b"{nope", method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req)
    assert e.value.code == 400 and "error" in json.loads(e.value.read())


def test_several_adapters_concurrently(client, engine, repo):
    jobs = [
        ("acme/attn", "Hello world"),
        ("beta/mlp", "Hello world"),
        ("acme/all", "Hello world"),
        ("tiny", "Hello world"),
    ] * 3  # more adapters than the server's 2 slots

    def call(job):
        model, prompt = job
        return client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(call, jobs))
    for (model, prompt), text in zip(jobs, texts, strict=True):
        assert text == expected(engine, repo, prompt, None if model == "tiny" else model).text


def test_vllm_load_and_unload_lora_adapter(server, client, engine, tiny_adapters, tmp_path):
    import httpx

    src = tiny_adapters["r4-all"]
    r = httpx.post(f"{server}/v1/load_lora_adapter", json={"lora_name": "sql-lora", "lora_path": str(src)})
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'sql-lora' added successfully."
    out = client.completions.create(model="sql-lora", prompt="Hello world", max_tokens=8, temperature=0)
    ref = engine.generate(["Hello world"], SamplingParams(max_tokens=8, temperature=0), [src])[0]
    assert out.choices[0].text == ref.text
    assert "default/sql-lora" in {m.id for m in client.models.list().data}
    again = httpx.post(f"{server}/v1/load_lora_adapter", json={"lora_name": "sql-lora", "lora_path": str(src)})
    assert again.status_code == 400 and "already been loaded" in again.text
    outside = shutil.copytree(src, tmp_path / "outside")
    r = httpx.post(f"{server}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(outside)})
    assert r.status_code == 403 and "outside the allowed" in r.text
    sneaky = str(src.parent / ".." / outside.parent.name / "outside")
    assert httpx.post(f"{server}/v1/load_lora_adapter", json={"lora_name": "y", "lora_path": sneaky}).status_code in (
        403,
        404,
    )
    assert httpx.post(f"{server}/v1/load_lora_adapter", json={"lora_name": "z"}).status_code == 400
    r = httpx.post(f"{server}/v1/load_lora_adapter", json={"lora_name": "z", "lora_path": str(src.parent)})
    assert r.status_code == 404 and "No adapter found" in r.text
    r = httpx.post(f"{server}/v1/unload_lora_adapter", json={"lora_name": "sql-lora"})
    assert r.status_code == 200 and "removed successfully" in r.text
    assert httpx.post(f"{server}/v1/unload_lora_adapter", json={"lora_name": "sql-lora"}).status_code == 404
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="sql-lora", prompt="Hi", max_tokens=2)


def test_vllm_unload_leaves_adapters_it_did_not_load(server, client, repo, tiny_adapters):
    """An adapter placed in the repository or uploaded is its tenant's only copy: unload refuses it (400) and
    deletes nothing; the upload API's DELETE remains the way to remove it."""
    import httpx

    src = tiny_adapters["r4-attn"]
    files = {f.name: (f.name, f.read_bytes()) for f in src.iterdir() if f.is_file()}
    assert httpx.post(f"{server}/v1/adapters", data={"name": "uploaded"}, files=files).status_code == 201
    for name, adapter_id in (("acme/attn", "acme/attn"), ("uploaded", "default/uploaded")):
        r = httpx.post(f"{server}/v1/unload_lora_adapter", json={"lora_name": name})
        assert r.status_code == 400 and "not loaded with /v1/load_lora_adapter" in r.text, r.text
        assert f"DELETE /v1/adapters/{adapter_id}" in r.text
        assert adapter_id in {m.id for m in client.models.list().data}
        assert client.completions.create(model=adapter_id, prompt="Hi", max_tokens=2, temperature=0).choices
    assert (repo / "acme" / "attn" / "adapter_config.json").is_file()
    assert httpx.delete(f"{server}/v1/adapters/default/uploaded").status_code == 200


def test_chat_max_completion_tokens(client):
    r = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], max_completion_tokens=3, temperature=0
    )
    assert r.usage.completion_tokens <= 3
    assert r.choices[0].finish_reason in ("length", "stop")


def test_n_choices_stream_side_by_side_and_equal_the_non_streamed_ones(client):
    messages = [{"role": "user", "content": "Tell me something"}]
    args = dict(model="acme/all", messages=messages, max_tokens=8, temperature=1.0, seed=7, n=3)
    whole = client.chat.completions.create(**args)
    assert len({c.message.content for c in whole.choices}) > 1  # seed + i per choice: they differ
    order, texts = [], ["", "", ""]
    for chunk in client.chat.completions.create(**args, stream=True):
        for c in chunk.choices:
            if c.delta.content:
                order.append(c.index)
                texts[c.index] += c.delta.content
    assert texts == [c.message.content for c in sorted(whole.choices, key=lambda c: c.index)]
    assert order != sorted(order)  # interleaved as generated, not one choice after another


def _chat_ids(engine, messages):
    tok = engine.tokenizer
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tok(text, add_special_tokens=False).input_ids


def test_completion_logprobs_are_the_engines_with_alternatives(client, engine, repo):
    r = client.completions.create(model="acme/attn", prompt="Hello world", max_tokens=5, temperature=0, logprobs=3)
    ref = expected(engine, repo, "Hello world", "acme/attn", max_tokens=5)
    lp = r.choices[0].logprobs
    assert lp.tokens == [engine.tokenizer.decode([t]) for t in ref.token_ids]
    assert lp.token_logprobs == pytest.approx(ref.logprobs, abs=1e-4)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) <= 4 and top[token] == pytest.approx(logprob, abs=1e-6)  # greedy: the best one
        assert logprob == pytest.approx(max(top.values()), abs=1e-6)
    streamed = [c.choices[0].logprobs for c in client.completions.create(
        model="acme/attn", prompt="Hello world", max_tokens=5, temperature=0, logprobs=3, stream=True
    ) if c.choices and c.choices[0].logprobs]  # fmt: skip
    assert [t for c in streamed for t in c.tokens] == lp.tokens
    assert [o for c in streamed for o in c.text_offset] == lp.text_offset
    assert [x for c in streamed for x in c.token_logprobs] == pytest.approx(lp.token_logprobs, abs=1e-6)
    plain = client.completions.create(model="acme/attn", prompt="Hello world", max_tokens=2, temperature=0)
    assert plain.choices[0].logprobs is None


def test_chat_logprobs_and_top_logprobs(client, engine, repo):
    messages = [{"role": "user", "content": "Say hi"}]
    args = dict(model="acme/attn", messages=messages, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2)
    r = client.chat.completions.create(**args)
    ref = expected(engine, repo, _chat_ids(engine, messages), "acme/attn", max_tokens=4)
    content = r.choices[0].logprobs.content
    assert [c.token for c in content] == [engine.tokenizer.decode([t]) for t in ref.token_ids]
    assert [c.logprob for c in content] == pytest.approx(ref.logprobs, abs=1e-4)
    for c in content:
        assert len(c.top_logprobs) == 2 and c.top_logprobs[0].token == c.token and c.bytes == list(c.token.encode())
        assert c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob
    streamed = [e for ch in client.chat.completions.create(**args, stream=True) if ch.choices and ch.choices[0].logprobs
                for e in ch.choices[0].logprobs.content]  # fmt: skip
    assert [e.token for e in streamed] == [c.token for c in content]
    no_top = client.chat.completions.create(**{**args, "top_logprobs": None})
    assert all(c.top_logprobs == [] for c in no_top.choices[0].logprobs.content)


def test_logit_bias_and_penalties_reach_the_sampler(client, engine):
    forced = engine.tokenizer.encode(" banana", add_special_tokens=False)[0]
    r = client.completions.create(
        model="tiny", prompt="Hello", max_tokens=3, temperature=0, logit_bias={str(forced): 100}
    )
    assert r.choices[0].text == engine.tokenizer.decode([forced] * 3)
    r = client.completions.create(
        model="tiny", prompt="Hello", max_tokens=3, temperature=0, logit_bias={str(forced): 100}, frequency_penalty=2,
        presence_penalty=2, extra_body={"repetition_penalty": 1.5},
    )  # fmt: skip
    assert r.choices[0].text.count(" banana") == 3  # +100 outweighs them; they are accepted, not refused
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        client.completions.create(model="tiny", prompt="Hello", max_tokens=2, logit_bias={"999999999": 5})


@pytest.mark.parametrize(
    "extra",
    [
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
        {"tool_choice": "required"},
        {"response_format": {"type": "json_object"}},
        {"best_of": 2},
        {"min_tokens": 3},
        {"guided_json": {"type": "object"}},
        {"include_stop_str_in_output": True},
        {"skip_special_tokens": False},
    ],
)
def test_features_not_built_are_refused_not_ignored(client, extra):
    with pytest.raises(openai.BadRequestError, match=f"`{next(iter(extra))}` is not supported"):
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=2, extra_body=extra
        )
    r = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=2, tool_choice="none",
        response_format={"type": "text"},
    )  # fmt: skip
    assert r.choices[0].message.content is not None  # neutral values are accepted


def test_chat_without_max_tokens_may_use_the_rest_of_the_context(client, engine):
    """vLLM: a chat request without max_tokens generates up to the context length, not 16 tokens."""
    messages = [{"role": "user", "content": "Hi"}]
    r = client.chat.completions.create(model="tiny", messages=messages, temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == engine.base.max_model_len - len(_chat_ids(engine, messages))
    assert r.choices[0].finish_reason == "length"


def test_echo_with_logprobs_scores_the_prompt(client, engine):
    """lm-eval's loglikelihood request: echo, logprobs and max_tokens 0 give the prompt's own logprobs."""
    prompt = "The capital of France is Paris"
    ref = engine.generate([prompt], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1))[0]
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=1, temperature=0)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == prompt and r.usage.completion_tokens == 0
    assert lp.tokens == [engine.tokenizer.decode([t]) for t in ref.prompt_token_ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx([e.logprob for e in ref.prompt_logprobs[1:]], abs=1e-4)
    assert all(len(top) <= 2 for top in lp.top_logprobs[1:])
    more = client.completions.create(model="tiny", prompt=prompt, max_tokens=3, echo=True, logprobs=0, temperature=0)
    assert more.choices[0].text.startswith(prompt) and len(more.choices[0].logprobs.tokens) == len(lp.tokens) + 3
    assert more.choices[0].logprobs.text_offset[len(lp.tokens)] == len(prompt)
    chunks = [c.choices[0].text for c in client.completions.create(
        model="tiny", prompt=prompt, max_tokens=3, echo=True, temperature=0, stream=True
    ) if c.choices]  # fmt: skip
    assert chunks[0] == prompt and "".join(chunks) == more.choices[0].text
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Hi"}], extra_body={"echo": True}
        )


def test_vllm_prompt_logprobs(client, engine):
    prompt = "Hello world, how are you"
    ref = engine.generate([prompt], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=2))[0]
    r = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=1, temperature=0, extra_body={"prompt_logprobs": 2}
    )
    got = r.choices[0].model_extra["prompt_logprobs"]
    assert got[0] is None and len(got) == len(ref.prompt_token_ids)
    for token_id, entry, want in zip(ref.prompt_token_ids[1:], got[1:], ref.prompt_logprobs[1:], strict=True):
        assert entry[str(token_id)]["rank"] == want.rank and entry[str(token_id)]["logprob"] == pytest.approx(
            want.logprob, abs=1e-4
        )
        assert {str(t) for t, _ in want.top} <= set(entry) and len(entry) <= 3
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=1, extra_body={"prompt_logprobs": 0}
    )
    assert chat.model_extra["prompt_logprobs"][0] is None and len(chat.model_extra["prompt_logprobs"]) > 3
    with pytest.raises(openai.BadRequestError, match="cannot stream"):
        client.completions.create(
            model="tiny", prompt="Hi", max_tokens=1, stream=True, extra_body={"prompt_logprobs": 1}
        )


@pytest.mark.parametrize(
    ("path", "extra", "reason"),
    [
        ("completions", {"logit_bias": [1, 2]}, "logit_bias"),
        ("completions", {"logit_bias": {str(i): 1 for i in range(1025)}}, "at most 1024"),
        ("completions", {"logit_bias": {"-5": 1}}, "keys must be token ids"),
        ("completions", {"logit_bias": {"5": 101}}, "bias"),
        ("completions", {"logprobs": 21}, "logprobs"),
        ("completions", {"logprobs": True}, "logprobs"),
        ("completions", {"prompt_logprobs": 21}, "prompt_logprobs"),
        ("completions", {"echo": True, "max_tokens": 0, "stream": True}, "cannot stream"),
        ("completions", {"max_tokens": 0}, "max_tokens"),
        ("completions", {"presence_penalty": 2.5}, "presence_penalty"),
        ("completions", {"repetition_penalty": 0}, "repetition_penalty"),
        ("completions", {"min_p": -0.1}, "min_p"),
        ("chat/completions", {"logprobs": "yes"}, "must be a boolean"),
        ("chat/completions", {"top_logprobs": 2}, "needs `logprobs: true`"),
        ("chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ],
)
def test_bad_sampling_and_logprobs_values_are_400(server, path, extra, reason):
    import httpx

    base = {"model": "tiny", "max_tokens": 2}
    base |= {"prompt": "Hi"} if path == "completions" else {"messages": [{"role": "user", "content": "Hi"}]}
    r = httpx.post(f"{server}/v1/{path}", json={**base, **extra}, timeout=30)
    assert r.status_code == 400 and reason in r.json()["error"]["message"], r.text
    stats = httpx.get(f"{server}/admin/stats", timeout=30).json()["engine"]
    assert stats["running"] == stats["waiting"] == 0  # nothing was queued
