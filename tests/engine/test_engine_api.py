"""Engine API: streaming (threads and asyncio), sampling options, stop conditions, cancellation, bad requests."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from conftest import copy_adapter, make_engine
from mux.engine.sequence import SamplingParams
from mux.errors import InvalidAdapter, InvalidRequest, MuxError, Overloaded

GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tiny_dir):
    return make_engine(tiny_dir, max_loras=2, max_lora_rank=16)


def idle(engine) -> bool:
    return (
        engine.blocks.num_free == engine.blocks.num_blocks
        and engine.adapters.num_pinned == 0
        and not engine.adapters.queued
        and not engine.scheduler.has_work()
    )


def test_stream_events_concatenate_to_result(engine, tiny_adapters):
    events = list(engine.submit("Hello world", GREEDY, tiny_adapters["r4-attn"]))
    assert len([e for e in events if e.token_id is not None]) == 10
    assert events[-1].finish_reason == "length" and all(e.finish_reason is None for e in events[:-1])
    again = engine.submit("Hello world", GREEDY, tiny_adapters["r4-attn"]).result()
    assert "".join(e.text for e in events) == again.text
    assert again.text == engine.tokenizer.decode(again.token_ids, skip_special_tokens=True)
    assert all(lp <= 0 for lp in again.logprobs)


def test_seeded_sampling_is_reproducible(engine):
    p = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=123, ignore_eos=True)
    a, b = engine.generate(["Once upon a time"] * 2, p)
    assert a.token_ids == b.token_ids
    c = engine.generate(["Once upon a time"], SamplingParams(max_tokens=12, temperature=1.0, seed=7, ignore_eos=True))[
        0
    ]
    assert c.token_ids != a.token_ids


def test_top_k_one_equals_greedy(engine):
    greedy = engine.generate(["Once upon a time"], GREEDY)[0]
    topk1 = engine.generate(
        ["Once upon a time"], SamplingParams(max_tokens=10, temperature=0.8, top_k=1, ignore_eos=True)
    )[0]
    assert greedy.token_ids == topk1.token_ids


def test_vanishing_temperature_is_greedy(engine):
    """logits / 1e-300 overflow to inf and softmax to NaN: below SAMPLING_EPS the row is greedy (vLLM's rule)."""
    greedy = engine.generate(["Once upon a time"], GREEDY)[0]
    for t in (1e-300, 5e-324, 1e-6):
        tiny = SamplingParams(max_tokens=10, temperature=t, seed=3, ignore_eos=True)
        assert engine.generate(["Once upon a time"], tiny)[0].token_ids == greedy.token_ids


def test_seeds_at_the_ends_of_the_range_sample(engine):
    for seed in (-(1 << 63), (1 << 63) - 1):
        params = SamplingParams(max_tokens=3, temperature=1.0, seed=seed, ignore_eos=True)
        assert len(engine.generate(["Once upon a time"], params)[0].token_ids) == 3


def test_a_failing_step_fails_its_requests_and_the_loop_serves_on(tiny_dir):
    """A fault while sampling, or anywhere in the loop outside the forward, must not end the serving loop:
    a loop that died silently left every later request hanging (found by the schemathesis fuzz test)."""
    engine = make_engine(tiny_dir, max_loras=2, max_lora_rank=16)
    engine.start()
    try:
        for owner, name in ((engine.sampler, "sample"), (engine.scheduler, "schedule")):
            real = getattr(owner, name)
            fault = [1]

            def wrapped(*args, real=real, fault=fault):
                if fault[0] and engine.scheduler.has_work():  # an idle loop's call would use the fault up
                    fault[0] = 0
                    raise RuntimeError("injected fault")
                return real(*args)

            setattr(owner, name, wrapped)
            stream = engine.submit("Hello", GREEDY)
            with pytest.raises(MuxError, match=r"injected fault|engine error"):
                stream.result()
            assert stream.finish_reason == "error" and not fault[0]
            assert engine.stats()["faults"][{"sample": "step", "schedule": "loop"}[name]] == 1
            assert len(engine.submit("Hello", GREEDY).result().token_ids) == 10
            assert idle(engine)
    finally:
        engine.stop()


def test_stop_string_truncates_and_is_not_emitted(engine):
    full = engine.generate(["Hello world"], GREEDY)[0]
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 3]
    assert stop.strip()
    out = engine.submit("Hello world", SamplingParams(max_tokens=10, temperature=0, stop=(stop,), ignore_eos=True))
    events = list(out)
    text = "".join(e.text for e in events)
    assert events[-1].finish_reason == "stop"
    assert text == full.text[: full.text.index(stop)] and stop not in text


def test_eos_and_stop_token_ids(engine):
    full = engine.generate(["Hello world"], GREEDY)[0]
    token = full.token_ids[3]
    out = engine.generate(
        ["Hello world"], SamplingParams(max_tokens=10, temperature=0, stop_token_ids=(token,), ignore_eos=True)
    )[0]
    assert out.finish_reason == "stop" and out.token_ids == full.token_ids[: full.token_ids.index(token) + 1]
    engine.eos_ids = frozenset({token})
    try:
        out = engine.generate(["Hello world"], SamplingParams(max_tokens=10, temperature=0))[0]
    finally:
        engine.eos_ids = frozenset(engine.base.eos_token_ids)
    assert out.finish_reason == "eos" and out.token_ids[-1] == token


def test_cancel_frees_kv_and_adapter_pin(engine, tiny_adapters):
    stream = engine.submit(
        "Hello world", SamplingParams(max_tokens=200, temperature=0, ignore_eos=True), tiny_adapters["r8-mlp"]
    )
    for _ in range(3):
        engine.step()
    assert engine.adapters.num_pinned == 1 and engine.blocks.num_free < engine.blocks.num_blocks
    stream.cancel()
    engine.step()
    assert idle(engine)
    assert stream.result().finish_reason == "cancelled"


def test_top_logprobs_travel_with_each_token(engine):
    out = engine.generate(["Hello world"], SamplingParams(max_tokens=4, temperature=0, top_logprobs=3))[0]
    assert len(out.top) == len(out.token_ids) == 4
    for token, logprob, top in zip(out.token_ids, out.logprobs, out.top, strict=True):
        assert len(top) == 3 and top[0][0] == token and top[0][1] == pytest.approx(logprob, abs=1e-6)
    assert engine.generate(["Hello"], GREEDY)[0].top == [None] * GREEDY.max_tokens


def test_a_queued_request_holds_its_adapter_in_use_until_it_ends(engine, tiny_adapters):
    """Submitted, not yet stepped (no slot, no pin): deleting its adapter now would fail it later."""
    path = tiny_adapters["r8-mlp"]
    stream = engine.submit("Hello world", GREEDY, path)
    assert engine.adapters.in_use(path) and engine.adapters.num_pinned == 0
    stream.cancel()
    engine.step()
    assert stream.result().finish_reason == "cancelled" and not engine.adapters.in_use(path) and idle(engine)
    done = engine.generate(["Hello"], GREEDY, [path])[0]
    assert done.finish_reason == "length" and not engine.adapters.in_use(path) and idle(engine)


def test_a_retired_adapter_takes_no_new_requests_until_forgotten(engine, tiny_adapters):
    """The delete path: retire (refused while in use), remove the files, forget. Between the first and the last
    step no request can hold the adapter, however recently it was prepared."""
    from mux.errors import AdapterNotFound

    path = tiny_adapters["r4-attn"]
    ref = engine.adapters.prepare(path)  # prepared before the delete began
    queued = engine.submit("Hello", GREEDY, ref)
    assert not engine.adapters.retire(path)  # in use: a delete would be 409
    queued.cancel()
    engine.step()
    assert engine.adapters.retire(path)
    with pytest.raises(AdapterNotFound):
        engine.submit("Hello", GREEDY, ref)
    with pytest.raises(AdapterNotFound):
        engine.adapters.pin(path)
    assert idle(engine)
    engine.adapters.forget(path)  # the delete is over (here the files stay: the adapter serves again)
    assert engine.generate(["Hello"], GREEDY, [path])[0].finish_reason == "length" and idle(engine)


def test_background_thread_and_asyncio_streams(tiny_dir, tiny_adapters):
    engine = make_engine(tiny_dir, max_loras=2, max_lora_rank=16)
    expected = engine.generate(["Hi", "Hello world"], GREEDY, [None, tiny_adapters["r4-all"]])
    engine.start()
    try:

        async def run():
            streams = [engine.submit("Hi", GREEDY), engine.submit("Hello world", GREEDY, tiny_adapters["r4-all"])]
            return await asyncio.gather(*(s.aresult() for s in streams))

        got = asyncio.run(run())
        assert [g.token_ids for g in got] == [e.token_ids for e in expected]
        threaded = engine.submit("Hi", GREEDY).result()
        assert threaded.token_ids == expected[0].token_ids
        # cancelling from another thread while the engine thread runs
        s = engine.submit("Hi", SamplingParams(max_tokens=400, temperature=0, ignore_eos=True))
        next(iter(s))
        s.cancel()
        assert s.result().finish_reason == "cancelled"
        deadline = time.time() + 10
        while not idle(engine) and time.time() < deadline:
            time.sleep(0.01)
        assert idle(engine)
    finally:
        engine.stop()


def test_an_idle_engine_sleeps_until_work_arrives(tiny_dir):
    engine = make_engine(tiny_dir, max_loras=2, max_lora_rank=16)
    steps = 0
    step = engine.step

    def counted():
        nonlocal steps
        steps += 1
        return step()

    engine.step = counted
    engine.start()
    try:
        engine.submit("Hi", GREEDY).result()
        time.sleep(0.05)  # the loop's last look after the request ended
        before = steps
        time.sleep(0.5)
        assert steps - before <= 1  # was 10 (a look every 50 ms) before an idle loop slept
        assert engine.submit("Hi", GREEDY).result().finish_reason == "length"  # a submit wakes it at once
    finally:
        engine.stop()


@pytest.mark.parametrize(
    ("prompt", "params", "match"),
    [
        ("", GREEDY, "empty"),
        ([10**9], GREEDY, "token ids"),
        ("Hi", SamplingParams(max_tokens=600, temperature=0), "context length"),
        ("Hi", SamplingParams(logit_bias=((10**9, 1.0),)), "logit_bias token ids"),
    ],
)
def test_bad_requests_are_refused_before_queueing(engine, prompt, params, match):
    with pytest.raises(InvalidRequest, match=match):
        engine.submit(prompt, params)
    assert idle(engine)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(temperature=-1),
        dict(top_p=0),
        dict(top_p=1.5),
        dict(max_tokens=0),
        dict(temperature=float("nan")),
        dict(top_k=-2),
        dict(stop=("",)),
        dict(seed=1 << 63),
        dict(seed=-(1 << 63) - 1),
    ],
)
def test_bad_sampling_values(kwargs):
    with pytest.raises(InvalidRequest):
        SamplingParams(**kwargs)


def test_admission_queue_is_bounded(tiny_dir):
    from mux.config import EngineConfig, ModelConfig, SchedulerConfig
    from mux.engine.engine import Engine

    engine = Engine(EngineConfig(model=ModelConfig(model=str(tiny_dir)), scheduler=SchedulerConfig(max_waiting=2)))
    engine.submit("a", GREEDY)
    engine.submit("b", GREEDY)
    with pytest.raises(Overloaded):
        engine.submit("c", GREEDY)


def test_request_deadline_ends_stuck_work(tiny_dir):
    from mux.config import EngineConfig, ModelConfig, SchedulerConfig
    from mux.engine.engine import Engine
    from mux.errors import DeadlineExceeded

    config = EngineConfig(model=ModelConfig(model=str(tiny_dir)), scheduler=SchedulerConfig(request_timeout_s=0.3))
    engine = Engine(config)
    engine.start()
    try:
        stream = engine.submit("a", SamplingParams(max_tokens=400, temperature=0, ignore_eos=True))
        with pytest.raises(DeadlineExceeded, match="deadline"):
            stream.result()
        assert stream.finish_reason == "timeout"
        time.sleep(0.1)
        assert engine.num_running == 0 and engine.blocks.num_free == engine.blocks.num_blocks
    finally:
        engine.stop()


def _record_read_threads(engine) -> list[str]:
    threads: list[str] = []
    read = engine.adapters._read_disk

    def recorded(path):
        threads.append(threading.current_thread().name)
        return read(path)

    engine.adapters._read_disk = recorded
    return threads


@pytest.mark.parametrize("between_steps", [True, False])
def test_disk_reads_run_between_steps_on_the_engine_thread(tiny_dir, tiny_adapters, tmp_path, between_steps):
    engine = make_engine(tiny_dir, max_loras=2, max_lora_rank=16, reads_between_steps=between_steps)
    threads = _record_read_threads(engine)
    broken = copy_adapter(tiny_adapters["r8-qv"], tmp_path / "broken")
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    engine.start()
    try:
        with ThreadPoolExecutor(4) as pool:  # request threads, as the server's
            refs = list(pool.map(engine.prepare_adapter, [tiny_adapters["r4-attn"], tiny_adapters["r8-mlp"]]))
            with pytest.raises(InvalidAdapter, match="safetensors"):
                pool.submit(engine.prepare_adapter, broken).result()
            assert pool.submit(engine.prepare_adapter, tiny_adapters["r4-attn"]).result() == refs[0]  # host hit
        assert [r.rank for r in refs] == [4, 8]
        out = engine.submit("Hello world", GREEDY, refs[1]).result()
        assert out.token_ids == engine.submit("Hello world", GREEDY, tiny_adapters["r8-mlp"]).result().token_ids
    finally:
        engine.stop()
    thread = "mux-engine" if between_steps else "ThreadPoolExecutor"
    assert len(threads) == 3 and all(t.startswith(thread) for t in threads), threads
    assert engine.adapters.cached(broken) is None and engine.adapters.stats()["tiers"]["host"]["count"] == 2


def test_a_read_the_loop_never_took_is_done_by_its_caller(tiny_dir, tiny_adapters, monkeypatch):
    engine = make_engine(tiny_dir, max_loras=2, max_lora_rank=16)
    threads = _record_read_threads(engine)
    monkeypatch.setattr("mux.engine.engine.READS_PER_STEP", 0)  # the loop serves no reads, even when it stops
    engine.start()
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(engine.prepare_adapter, tiny_adapters["r4-attn"])
        time.sleep(0.3)
        assert not pending.done()
        engine.stop()
        assert pending.result(timeout=5).rank == 4
    assert len(threads) == 1 and threads[0].startswith("ThreadPoolExecutor")


def test_an_overflowing_adapter_fails_only_its_own_requests(engine, tiny_adapters, tmp_path):
    """Finite but huge B weights pass validation and make that adapter's logits inf/NaN: its requests, greedy or
    sampled, fail alone; a base request in the same steps finishes (a sampled row used to fail the whole step,
    and a greedy one streamed the argmax of NaNs with a NaN logprob)."""
    from safetensors.torch import load_file, save_file

    hot = copy_adapter(tiny_adapters["r8-mlp"], tmp_path / "hot")
    weights = load_file(hot / "adapter_model.safetensors")
    save_file({k: torch.full_like(v, 1e30) for k, v in weights.items()}, hot / "adapter_model.safetensors")
    bystander = engine.submit("Hello world", GREEDY)
    sampled = engine.submit("Hello world", SamplingParams(max_tokens=10, temperature=1.0, seed=0), hot)
    greedy = engine.submit("Hello world", GREEDY, hot)
    for stream in (sampled, greedy):
        with pytest.raises(MuxError, match="not finite"):
            stream.result()
        assert stream.finish_reason == "error" and stream.num_tokens == 0
    assert len(bystander.result().token_ids) == 10
    assert idle(engine)
