"""bench.serving's readers count what the server streamed: the minimal SSE reader, the openai SDK and the
in-process stream agree on the same greedy request (a miscount would skew C's ratios)."""

import asyncio

from bench.serving import engine_stream_one, openai_client, raw_stream_one, stream_one
from conftest import make_engine, run_server

PROMPT = "The quick brown fox jumps over the lazy dog and then"


def test_minimal_reader_sdk_and_engine_count_the_same_tokens(tiny_dir, tmp_path):
    async def over_http(base: str) -> tuple[int, int]:
        client = openai_client(base)
        _, gaps, sdk = await stream_one(client, "tiny", PROMPT, 12)
        await client.close()
        assert len(gaps) == sdk - 1
        return sdk, await raw_stream_one(base, "tiny", PROMPT, 12)

    with run_server(tiny_dir, tmp_path) as base:
        sdk, raw = asyncio.run(over_http(base))

    engine = make_engine(tiny_dir)
    engine.start()
    try:
        ttft, _, direct = asyncio.run(engine_stream_one(engine, None, PROMPT, 12))
    finally:
        engine.stop()
    assert 0 < sdk <= 12 and ttft > 0
    assert raw == sdk == direct
