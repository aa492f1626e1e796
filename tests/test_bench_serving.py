"""bench.serving's readers count the tokens generated: the minimal SSE reader and the openai SDK (from the
response's usage) and the in-process stream agree on the same greedy request, with one token per chunk or
several (`--stream-interval`); a miscount would skew C's ratios."""

import asyncio

from bench.serving import engine_stream_one, openai_client, raw_stream_one, stream_one
from conftest import make_engine, run_server

PROMPT = "The quick brown fox jumps over the lazy dog and then"


def test_minimal_reader_sdk_and_engine_count_the_same_tokens(tiny_dir, tmp_path):
    async def over_http(base: str) -> tuple[int, int]:
        client = openai_client(base)
        _, gaps, sdk = await stream_one(client, "tiny", PROMPT, 12)
        await client.close()
        return sdk, len(gaps), await raw_stream_one(base, "tiny", PROMPT, 12)

    with run_server(tiny_dir, tmp_path) as base:
        sdk, gaps, raw = asyncio.run(over_http(base))
    with run_server(tiny_dir, tmp_path, "--stream-interval", "4") as base:
        sdk_by_4, gaps_by_4, raw_by_4 = asyncio.run(over_http(base))

    engine = make_engine(tiny_dir)
    engine.start()
    try:
        ttft, _, direct = asyncio.run(engine_stream_one(engine, None, PROMPT, 12))
    finally:
        engine.stop()
    assert ttft > 0
    assert raw == sdk == direct == raw_by_4 == sdk_by_4 == 12
    assert gaps <= 11 and gaps_by_4 <= 3  # text chunks: at most one per token; by 4: the first, then 4 at a time
