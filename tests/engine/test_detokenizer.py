"""Incremental detokenization: deltas add up to the full decode; stop strings are held back and cut."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from mux.engine.detokenizer import Detokenizer


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.mark.parametrize(
    "text", ["Hello, world! How are you?", "Ünïcødé ✓ 東京 🚀 emoji", "  leading spaces\n\nnewlines"]
)
def test_deltas_concatenate_to_decode(tok, text):
    ids = tok(text).input_ids
    d = Detokenizer(tok, tok("Prompt:").input_ids, ())
    out = "".join(d.add(t)[0] for t in ids) + d.flush()
    assert out == tok.decode(ids, skip_special_tokens=True)


def test_stop_string_spanning_tokens_is_never_emitted(tok):
    ids = tok("The answer is STOP and more").input_ids
    d = Detokenizer(tok, [], ("STOP",))
    emitted = ""
    for t in ids:
        delta, stopped = d.add(t)
        emitted += delta
        if stopped:
            break
    assert stopped and emitted == "The answer is " and "ST" not in emitted


def test_the_rust_decode_it_calls_equals_the_tokenizers_own(tok):
    import random

    rnd = random.Random(0)
    d = Detokenizer(tok, [], ())
    assert d._decode != tok.decode  # the fast path is the one taken for SmolLM2's tokenizer
    for _ in range(500):
        ids = [rnd.randrange(len(tok)) for _ in range(rnd.randrange(1, 8))]
        assert d._decode(ids, skip_special_tokens=True) == tok.decode(ids, skip_special_tokens=True)
