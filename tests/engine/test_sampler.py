"""Logits processing (bias, penalties, min-p) and top logprobs, against the references they follow (HF, OpenAI)."""

from __future__ import annotations

import pytest
import torch

from mux.engine.sampler import Sampler
from mux.engine.sequence import SamplingParams, Sequence
from mux.errors import InvalidRequest

V = 50


def seq(prompt=(1, 2, 3), output=(), **params) -> Sequence:
    s = Sequence(list(prompt), SamplingParams(**{"temperature": 0, **params}))
    s.output_ids = list(output)
    return s


def logits(rows: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * 3


def test_unprocessed_rows_are_untouched_and_logprobs_are_log_softmax():
    x = logits(2)
    before = x.clone()
    tokens, logprobs, tops = Sampler().sample(x, [seq(), seq(top_logprobs=3)])
    assert torch.equal(x, before) and tokens == before.argmax(-1).tolist()
    assert logprobs == pytest.approx(torch.log_softmax(before, -1).max(-1).values.tolist(), abs=1e-5)
    assert tops[0] is None and [t for t, _ in tops[1]] == before[1].topk(3).indices.tolist()
    assert [lp for _, lp in tops[1]] == pytest.approx(
        torch.log_softmax(before[1], -1).topk(3).values.tolist(), abs=1e-5
    )
    assert tops[1][0] == (tokens[1], pytest.approx(logprobs[1], abs=1e-6))


def test_logit_bias_moves_the_greedy_choice():
    x = logits()
    loser = int(x[0].argmin())
    tokens, logprobs, _ = Sampler().sample(x, [seq(logit_bias=((loser, 100.0),))])
    assert tokens == [loser] and logprobs[0] > -1e-3  # the bias is part of the distribution reported


def test_repetition_penalty_matches_transformers():
    from transformers import RepetitionPenaltyLogitsProcessor

    x = logits()
    s = seq(prompt=(1, 2, 3, 7), output=(9, 2), repetition_penalty=1.3)
    ids = torch.tensor([s.prompt_ids + s.output_ids])
    want = RepetitionPenaltyLogitsProcessor(1.3)(ids, x.clone())
    Sampler().sample(x, [s])
    assert torch.allclose(x, want)


def test_presence_and_frequency_penalties_follow_openai():
    """logit[t] -= count[t] * frequency_penalty + (count[t] > 0) * presence_penalty, over generated tokens."""
    x = logits()
    want = x.clone()
    for t, n in ((4, 3), (8, 1)):
        want[0, t] -= n * 0.5 + 0.25
    Sampler().sample(x, [seq(prompt=(11, 12), output=(4, 8, 4, 4), frequency_penalty=0.5, presence_penalty=0.25)])
    assert torch.allclose(x, want)


def test_min_p_never_samples_below_its_share_of_the_top_token():
    row = torch.zeros(1, V)
    row[0, :3] = torch.tensor([5.0, 4.5, 4.0])  # p(0)≈0.4; min_p 0.5 keeps tokens 0 and 1 only
    sampler, s = Sampler(), seq(temperature=1.0, min_p=0.5, seed=3)
    drawn = {sampler.sample(row.clone(), [s])[0][0] for _ in range(200)}
    assert drawn == {0, 1}


@pytest.mark.parametrize(
    "bad",
    [
        {"min_p": 1.5},
        {"presence_penalty": 3},
        {"frequency_penalty": float("nan")},
        {"repetition_penalty": 0},
        {"logit_bias": ((1, 101.0),)},
        {"top_logprobs": 21},
    ],
)
def test_out_of_range_values_are_refused(bad):
    with pytest.raises(InvalidRequest):
        SamplingParams(**bad)
