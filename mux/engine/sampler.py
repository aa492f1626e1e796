"""Turning logits into tokens: greedy rows in one argmax, sampled rows with their own (seeded) generators.

On CPU float32 the argmax and the log-normaliser of every row come from one C kernel (`mux/csrc/sampling.c`):
3.9× torch's argmax + logsumexp over 64 rows of 49,152 logits (`python -m bench.step_ops`).
"""

from __future__ import annotations

import torch

from mux import native
from mux.engine.sequence import SamplingParams, Sequence


class Sampler:
    def __init__(self) -> None:
        self._generators: dict[int, torch.Generator] = {}  # seq_id -> per-request seeded generator
        self._shared = torch.Generator()
        self._shared.seed()

    def forget(self, seq_id: int) -> None:
        self._generators.pop(seq_id, None)

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[float]]:
        """logits [B, V] float32, row i for seqs[i]. Returns token ids and their logprobs. A row with a non-finite
        value (e.g. from an adapter whose huge weights overflow) keeps its argmax and gets a non-finite logprob,
        which fails only its own sequence: it is never sampled (torch.multinomial would fail the step)."""
        tokens, lse = _argmax_logsumexp(logits)  # [B], [B]; lse is inf or NaN exactly for such rows
        for i, seq in enumerate(seqs):
            if not seq.params.greedy and torch.isfinite(lse[i]):
                tokens[i] = self._sample_row(logits[i], seq.params, self._generator(seq.seq_id, seq.params))
        logprobs = logits.gather(1, tokens[:, None])[:, 0] - lse  # [B], no [B, V] written
        return tokens.tolist(), logprobs.tolist()

    def _generator(self, seq_id: int, params: SamplingParams) -> torch.Generator:
        if params.seed is None:
            return self._shared
        gen = self._generators.get(seq_id)
        if gen is None:
            gen = self._generators[seq_id] = torch.Generator().manual_seed(params.seed)
        return gen

    @staticmethod
    def _sample_row(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator) -> int:
        scores = logits / params.temperature  # [V]
        if params.top_k > 0 and params.top_k < scores.numel():
            kth = torch.topk(scores, params.top_k).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if params.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=True)
            cum = torch.softmax(sorted_scores, dim=-1).cumsum(dim=-1)
            drop = cum - torch.softmax(sorted_scores, dim=-1) >= params.top_p  # keeps the token crossing top_p
            scores = scores.scatter(0, order[drop], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs.cpu(), 1, generator=gen))


def _argmax_logsumexp(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(argmax [B] int64, logsumexp [B]) of logits [B, V]: in C where it can, else torch (and for NaN rows)."""
    if native.serves(logits.device, logits.dtype) and logits.stride(1) == 1 and logits.shape[1] > 0:
        rows = logits.shape[0]
        tokens, lse = torch.empty(rows, dtype=torch.int64), torch.empty(rows)
        native.library().mux_argmax_logsumexp(
            logits.data_ptr(), rows, logits.shape[1], logits.stride(0), tokens.data_ptr(), lse.data_ptr()
        )
        if not torch.isnan(lse).any():
            return tokens, lse
    return logits.argmax(dim=-1), torch.logsumexp(logits, dim=-1)
