"""`ModelConfig.overlap_output` (on by default on CUDA): a step's text and stream pushes run during the next step.
Forced on here, on the CPU: every stream must see exactly the events of the engine without it, and a request
ended while its last token's text is pending still gets that text first."""

from __future__ import annotations

import pytest

from mux.config import CacheConfig, EngineConfig, LoRAConfig, ModelConfig
from mux.engine.engine import Engine
from mux.engine.sequence import SamplingParams
from mux.errors import MuxError


def engine_with(tiny_dir, overlap: bool) -> Engine:
    return Engine(
        EngineConfig(
            model=ModelConfig(model=str(tiny_dir), overlap_output=overlap),
            lora=LoRAConfig(max_loras=4, max_lora_rank=16),
            cache=CacheConfig(kv_cache_bytes=64 << 20),
        )
    )


@pytest.fixture(scope="module")
def engines(tiny_dir):
    return engine_with(tiny_dir, False), engine_with(tiny_dir, True)


def events_of(engine: Engine, prompts, params, adapters):
    streams = [engine.submit(p, params[i], adapters[i]) for i, p in enumerate(prompts)]
    events = [list(s) for s in streams]
    engine.step()  # nothing left to run: anything pushed after a final event would show in the counts
    for stream, mine in zip(streams, events, strict=True):
        assert stream.num_tokens == sum(e.token_id is not None for e in mine)
    return events


def same(a, b) -> bool:
    """Events equal, logprobs within float noise (a batch of another size may round differently)."""

    def close(x, y) -> bool:
        return (x is None and y is None) or (x is not None and y is not None and abs(x - y) < 1e-4)

    def same_top(x, y) -> bool:
        if x is None or y is None:
            return x is y
        ids = [i for i, _ in x] == [i for i, _ in y]
        return ids and all(close(a, b) for (_, a), (_, b) in zip(x, y, strict=True))

    return len(a) == len(b) and all(
        (e.token_id, e.text, e.finish_reason, e.error) == (f.token_id, f.text, f.finish_reason, f.error)
        and close(e.logprob, f.logprob)
        and same_top(e.top, f.top)
        for e, f in zip(a, b, strict=True)
    )


def test_off_on_the_cpu_by_default(tiny_dir):
    assert not Engine(EngineConfig(model=ModelConfig(model=str(tiny_dir)))).overlap_output


def test_every_stream_sees_the_same_events(engines, tiny_adapters):
    """A mixed batch: greedy, seeded sampling with top logprobs, stop strings (found in a pending token's text:
    the request ends one step after it was scheduled again), stop token ids, max_tokens, EOS off."""
    plain, overlapped = engines
    full = plain.generate(["Hello world"], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 3]
    params = [
        SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, stop=(stop,)),
        SamplingParams(max_tokens=9, temperature=0.8, seed=7, top_logprobs=2, ignore_eos=True),
        SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, stop_token_ids=(full.token_ids[5],)),
        SamplingParams(max_tokens=1, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=2, temperature=0, ignore_eos=True, presence_penalty=0.5),
    ]
    adapters = [None, None, tiny_adapters["r4-attn"], None, tiny_adapters["r8-mlp"], tiny_adapters["r8-mlp"]]
    prompts = ["Hello world"] * 2 + ["a b c", "Hello world", "x", "def f():"]
    want = events_of(plain, prompts, params, adapters)
    finished = sum(overlapped.finished.values())
    got = events_of(overlapped, prompts, params, adapters)
    assert sum(overlapped.finished.values()) - finished == len(prompts)  # each ended once
    assert all(same(g, w) for g, w in zip(got, want, strict=True))
    assert [w[-1].finish_reason for w in want] == ["length", "stop", "length", "stop", "length", "length"]
    assert not overlapped._pending and not overlapped.sampler._generators  # nothing left behind
    assert overlapped.blocks.num_free == overlapped.blocks.num_blocks and overlapped.adapters.num_pinned == 0


def test_a_cancel_while_text_is_pending_sends_that_text_first(engines):
    plain, overlapped = engines
    params = SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)
    want = events_of(plain, ["Hello world"], [params], [None])[0]
    stream = overlapped.submit("Hello world", params)
    for _ in range(4):  # the prefill, then three decodes: the third decode's token is pending
        overlapped.step()
    assert overlapped._pending
    stream.cancel()
    overlapped.step()
    events = list(stream)
    assert same(events[:4], want[:4])  # the four tokens, the pending one's text included
    assert len(events) == 5 and events[-1].finish_reason == "cancelled"
    assert overlapped.blocks.num_free == overlapped.blocks.num_blocks and not overlapped._pending


def test_a_failed_step_sends_the_pending_text_before_the_error(engines):
    plain, overlapped = engines
    params = SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)
    want = events_of(plain, ["Hello world"], [params], [None])[0]
    stream = overlapped.submit("Hello world", params)
    for _ in range(3):  # the prefill and two decodes: the second decode's token is pending
        overlapped.step()
    run = overlapped.runner.run

    def failing(*args):
        raise RuntimeError("injected fault")

    overlapped.runner.run = failing
    try:
        overlapped.step()
    finally:
        overlapped.runner.run = run
    events = []
    with pytest.raises(MuxError, match="injected fault"):
        events.extend(stream)
    assert same(events, want[:3])  # the three tokens, the pending one's text included, then the error raised
    assert stream.finish_reason == "error" and all(s.pending is None for s in overlapped._pending)
    assert overlapped.blocks.num_free == overlapped.blocks.num_blocks
