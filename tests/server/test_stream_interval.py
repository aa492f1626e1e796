"""`--stream-interval N`: OpenAI streams send the first token at once, then N tokens per chunk, and the last
chunk carries what is left; the text, logprobs and usage equal the non-streamed reply's (a real `mux serve`)."""

from __future__ import annotations

import shutil

import openai
import pytest

from conftest import run_server

INTERVAL = 3


@pytest.fixture(scope="module")
def client(tiny_dir, tmp_path_factory, tiny_adapters):
    root = tmp_path_factory.mktemp("adapters")
    shutil.copytree(tiny_adapters["r16-all"], root / "acme" / "all")
    with run_server(tiny_dir, root, "--stream-interval", str(INTERVAL)) as base:
        yield openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)


ARGS = dict(model="acme/all", prompt="Hello world", max_tokens=8, temperature=0, extra_body={"ignore_eos": True})


def test_completion_chunks_hold_interval_tokens_and_equal_the_whole_reply(client):
    whole = client.completions.create(**ARGS, logprobs=2)
    chunks = list(client.completions.create(**ARGS, logprobs=2, stream=True, stream_options={"include_usage": True}))
    choices = [c.choices[0] for c in chunks if c.choices]
    assert [len(c.logprobs.tokens) for c in choices] == [1, 3, 3, 1]  # 8 tokens: the first alone, then by 3
    assert "".join(c.text for c in choices) == whole.choices[0].text
    assert [t for c in choices for t in c.logprobs.tokens] == whole.choices[0].logprobs.tokens
    streamed = [lp for c in choices for lp in c.logprobs.token_logprobs]
    assert streamed == pytest.approx(whole.choices[0].logprobs.token_logprobs, abs=1e-5)
    assert [o for c in choices for o in c.logprobs.text_offset] == whole.choices[0].logprobs.text_offset
    assert [c.finish_reason for c in choices] == [None, None, None, "length"]
    assert chunks[-1].usage.completion_tokens == 8


def test_chat_stream_and_n_choices_with_an_interval(client):
    messages = [{"role": "user", "content": "Say hi"}]
    args = dict(model="acme/all", messages=messages, max_tokens=7, temperature=0, n=2, extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**args, logprobs=True)
    chunks = [c for c in client.chat.completions.create(**args, logprobs=True, stream=True) if c.choices]
    for i in range(2):
        mine = [c.choices[0] for c in chunks if c.choices[0].index == i and c.choices[0].logprobs]
        assert [len(c.logprobs.content) for c in mine] == [1, 3, 3]
        assert "".join(c.delta.content or "" for c in mine) == whole.choices[i].message.content
        assert [e.token for c in mine for e in c.logprobs.content] == [
            e.token for e in whole.choices[i].logprobs.content
        ]
        assert mine[-1].finish_reason == "length"


def test_without_logprobs_fewer_chunks_same_text(client):
    whole = client.completions.create(**ARGS).choices[0].text
    texts = [c.choices[0].text for c in client.completions.create(**ARGS, stream=True)]
    assert "".join(texts) == whole and len(texts) <= 4
