"""The shared request path: a host-tier hit is prepared on the event loop, only a disk read takes a worker
thread (so requests for resident adapters never queue for workers behind cold reads)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import mux.server.serving as serving_module
from conftest import make_engine
from mux.engine.sequence import SamplingParams
from mux.server.auth import OPEN
from mux.server.limits import Limits, TenantLimit
from mux.server.serving import Serving


def test_only_a_disk_read_takes_a_worker_thread(tiny_dir, tiny_adapters, monkeypatch):
    engine = make_engine(tiny_dir, max_loras=2, max_lora_rank=16)
    path = tiny_adapters["r8-qv"]
    state = SimpleNamespace(
        engine=engine,
        base_name="tiny",
        auth=SimpleNamespace(adapter_id=lambda caller, model: model, check=lambda caller, adapter_id: None),
        repository=SimpleNamespace(choose=lambda adapter_id, session: path),
        limits=Limits(TenantLimit(), {}),
    )
    to_thread = []
    run_in_threadpool = serving_module.run_in_threadpool

    async def counted(fn, *args):
        to_thread.append(fn.__name__)
        return await run_in_threadpool(fn, *args)

    monkeypatch.setattr(serving_module, "run_in_threadpool", counted)
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)

    async def one() -> list[int]:
        (stream,) = await Serving(state).submit(OPEN, "acme/qv", ["Hello world"], params)
        return (await stream.aresult()).token_ids

    engine.start()
    try:
        cold, hot = asyncio.run(one()), asyncio.run(one())
    finally:
        engine.stop()
    assert to_thread == ["prepare_adapter"]  # the first request read from disk; the second was a host hit
    assert cold == hot and len(cold) == 4
