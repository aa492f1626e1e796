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
    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[float], list]:
        """logits [B, V] float32, row i for seqs[i]. Returns token ids, their logprobs and, per row, the
        `top_logprobs` most likely (token id, logprob) pairs (None where none were asked for).

        Penalties and a logit bias change a row in place first; logprobs are of the row as processed, before
        temperature, top-k/p and min-p (vLLM's "processed" logprobs). A row with a non-finite value (e.g. from
        an adapter whose huge weights overflow) keeps its argmax and gets a non-finite logprob, which fails
        only its own sequence: it is never sampled (torch.multinomial would fail the step)."""
        for i, seq in enumerate(seqs):
            if seq.params.processed:
                _process(logits[i], seq)
        tokens, lse = _argmax_logsumexp(logits)  # [B], [B]; lse is inf or NaN exactly for such rows
        for i, seq in enumerate(seqs):
            if not seq.params.greedy and torch.isfinite(lse[i]):
                tokens[i] = self._sample_row(logits[i], seq.params, self._generator(seq.seq_id, seq.params))
        logprobs = logits.gather(1, tokens[:, None])[:, 0] - lse  # [B], no [B, V] written
        tops = [_top(logits[i], lse[i], s.params.top_logprobs) if s.params.top_logprobs else None
                for i, s in enumerate(seqs)]  # fmt: skip
        return tokens.tolist(), logprobs.tolist(), tops

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
        if params.min_p > 0:
            probs = torch.softmax(scores, dim=-1)
            scores = scores.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
        if params.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=True)
            cum = torch.softmax(sorted_scores, dim=-1).cumsum(dim=-1)
            drop = cum - torch.softmax(sorted_scores, dim=-1) >= params.top_p  # keeps the token crossing top_p
            scores = scores.scatter(0, order[drop], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs.cpu(), 1, generator=gen))


def _process(row: torch.Tensor, seq: Sequence) -> None:
    """Apply the sequence's logit bias and penalties to its logits row [V], in place (vLLM's semantics)."""
    p, device = seq.params, row.device  # the row's own device: index_add_ and -= refuse a CPU index or operand
    if p.logit_bias:
        ids, bias = zip(*p.logit_bias, strict=True)
        row.index_add_(0, torch.tensor(ids, device=device), torch.tensor(bias, dtype=row.dtype, device=device))
    if p.repetition_penalty != 1:
        seen = torch.tensor(sorted({*seq.prompt_ids, *seq.output_ids}), device=device)
        values = row[seen]
        row[seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and seq.output_ids:
        ids, counts = torch.tensor(seq.output_ids, device=device).unique(return_counts=True)
        row[ids] -= p.frequency_penalty * counts.to(row.dtype) + p.presence_penalty


def _top(row: torch.Tensor, lse: torch.Tensor, k: int) -> tuple[tuple[int, float], ...]:
    values, ids = torch.topk(row, min(k, row.numel()))
    return tuple(zip(ids.tolist(), (values - lse).tolist(), strict=True))


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
