"""Builds one step's flat batch (all sequences' tokens in one row), runs the model, returns the logits to sample.

Per step the runner publishes the attention layout and the LoRA layout once; every layer reads them. On CUDA a
pure decode step replays a captured graph instead (`mux/engine/graphs.py`); on the CPU it makes the same kernel
calls without transformers' forward (`mux/engine/cpu_decode.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from mux import triton_ops
from mux.engine.cpu_decode import CPUDecode
from mux.engine.graphs import DecodeGraphs
from mux.engine.kv_cache import (
    ATTN_IMPLEMENTATION,
    AttentionMetadata,
    KVCache,
    PrefillGroup,
    PrefillSpan,
    decode_mask,
)
from mux.engine.scheduler import Scheduled
from mux.engine.sequence import PromptLogprob, Sequence
from mux.lora.layers import MultiLoRAModel
from mux.lora.ops import build_lora_batch, per_token_batch

PROMPT_ROWS = 256  # prompt positions whose logits are made at once for prompt logprobs


@dataclass(frozen=True, slots=True)
class PromptSpan:
    """A prefill chunk's prompt positions first .. first + len(hidden) - 1, each predicting the next prompt token."""

    seq: Sequence
    first: int
    hidden: torch.Tensor  # [m, hidden size]


class ModelRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        lora: MultiLoRAModel,
        cache: KVCache,
        max_graph_batch: int = 0,
        cpu_decode: bool = True,
    ) -> None:
        """max_graph_batch: on CUDA, decode steps of up to this many sequences replay CUDA graphs (0: never).
        cpu_decode: on the CPU, decode steps make the model's kernel calls without transformers' forward where the
        model qualifies (`mux/engine/cpu_decode.py`)."""
        self.model = model
        self.lora = lora
        self.cache = cache
        self.device = next(model.parameters()).device
        self.per_token_lora = triton_ops.serves(self.device)  # the Triton kernel reads every row's slot in place
        model.config._attn_implementation = ATTN_IMPLEMENTATION
        on_cuda = self.device.type == "cuda" and max_graph_batch > 0
        self.graphs = DecodeGraphs(model, lora, cache, max_graph_batch) if on_cuda else None
        self.cpu_decode = CPUDecode.for_model(model, cache) if cpu_decode else None

    @torch.inference_mode()
    def run(self, scheduled: list[Scheduled]) -> tuple[torch.Tensor, list[PromptSpan]]:
        """Forward the scheduled tokens. Returns float32 logits [num_sampled, V] in `scheduled` order of
        sample=True, and for each prefill chunk of a sequence that asked for prompt logprobs the hidden states
        of its prompt positions (see `prompt_logprobs`)."""
        if self.graphs is not None and self.graphs.takes(scheduled):
            logits = self._replay(scheduled)
            if logits is not None:
                return logits, []
        # single-token sequences first (the attention layout), then by slot: each slot's rows form one run,
        # which the LoRA kernel serves in place when it is long enough
        order = sorted(scheduled, key=lambda s: (s.num_tokens != 1, s.seq.slot))
        bs = self.cache.block_size
        ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        groups: dict[int, list[int]] = {}
        sample_rows: dict[int, int] = {}  # seq_id -> row of its last token
        wants_prompt: list[tuple[Sequence, int, int, int]] = []  # (seq, first position, first row, rows)
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        prefills: list[PrefillSpan] = []
        for s in order:
            seq, start, n = s.seq, len(ids), s.num_tokens
            first = seq.num_computed
            ids.extend(seq.token_ids(first, first + n))
            table = seq.block_table
            for p in range(first, first + n):
                positions.append(p)
                slot_mapping.append(table[p // bs] * bs + p % bs)
            if seq.slot >= 0:
                groups.setdefault(seq.slot, []).extend(range(start, start + n))
            if s.sample:
                sample_rows[seq.seq_id] = start + n - 1
            if seq.params.prompt_logprobs is not None and first < len(seq.prompt_ids) - 1:
                m = min(first + n, len(seq.prompt_ids) - 1) - first  # positions that predict a prompt token
                wants_prompt.append((seq, first, start, m))
            ctx = first + n
            if n == 1:
                decode_tables.append(table[: -(-ctx // bs)])
                decode_lens.append(ctx)
            else:
                prefix = self._tensor(table[: -(-ctx // bs)]) if first else None
                prefills.append(PrefillSpan(start, n, ctx, prefix))

        lens = self._tensor(decode_lens) if decode_lens else None  # [B]
        prefills, prefill_groups = self._group_prefills(prefills)
        meta = AttentionMetadata(
            self.cache,
            self._tensor(slot_mapping),
            len(decode_lens),
            *self._decode_layout(decode_tables, lens),
            tuple(prefills),
            lens,
            prefill_groups,
        )
        rank = max((self.lora.slot_rank[slot] for slot in groups), default=0)
        layers = self.lora.layers_of(groups)
        # decode rows only: the Triton kernel's measured case; runs of a prefill chunk keep the matmul layouts
        # (not yet measured side by side on a GPU)
        if self.per_token_lora and not prefills and not prefill_groups:
            self.lora.ctx.batch = per_token_batch(self._row_slots(groups, len(ids)), rank, layers) if groups else None
        else:
            batch = build_lora_batch(
                groups,
                rank,
                self.device,
                self.lora.dtype,
                slot_ranks=self.lora.slot_rank,
                use_native=self.lora.native,
                rows=len(ids) if self.lora.fused_few_rows else None,
            )
            self.lora.ctx.batch = batch if batch is None or layers is None else replace(batch, layers=layers)
        try:
            if self.cpu_decode is not None and self.cpu_decode.takes(len(ids), meta):
                hidden = self.cpu_decode.run(self._tensor(ids), self._tensor(positions), meta, self.lora.ctx.batch)
            else:
                hidden = self.model.model(
                    input_ids=self._tensor(ids)[None],
                    position_ids=self._tensor(positions)[None],
                    use_cache=False,
                    mux_attn=meta,
                ).last_hidden_state[0]  # [T, hidden]
        finally:
            self.lora.ctx.batch = None
        rows = [sample_rows[s.seq.seq_id] for s in scheduled if s.sample]
        logits = self.model.lm_head(hidden[self._tensor(rows)]).float()  # [num_sampled, V]
        return logits, [PromptSpan(seq, first, hidden[row : row + m]) for seq, first, row, m in wants_prompt]

    @torch.inference_mode()
    def prompt_logprobs(self, span: PromptSpan, k: int) -> list[PromptLogprob]:
        """Each position's logprob of the prompt token after it, its rank and the top `k`, PROMPT_ROWS rows of
        logits at a time (a 2,048-token chunk's [T, V] float32 logits at once would be 400 MB for SmolLM2)."""
        targets = span.seq.prompt_ids[span.first + 1 : span.first + 1 + len(span.hidden)]
        out: list[PromptLogprob] = []
        for at in range(0, len(targets), PROMPT_ROWS):
            lp = torch.log_softmax(self.model.lm_head(span.hidden[at : at + PROMPT_ROWS]).float(), dim=-1)  # [r, V]
            target = self._tensor(targets[at : at + PROMPT_ROWS])[:, None]  # [r, 1]
            chosen = lp.gather(1, target)  # [r, 1]
            ranks = (lp > chosen).sum(dim=1) + 1  # [r]
            top = torch.topk(lp, k, dim=1) if k else None
            for j, (c, rank) in enumerate(zip(chosen[:, 0].tolist(), ranks.tolist(), strict=True)):
                alts = tuple(zip(top.indices[j].tolist(), top.values[j].tolist(), strict=True)) if top else ()
                out.append(PromptLogprob(c, rank, alts))
        return out

    def _replay(self, scheduled: list[Scheduled]) -> torch.Tensor | None:
        """A decode step through a captured graph: logits [B, V] float32 in `scheduled` order (None: no graph)."""
        bs = self.cache.block_size
        ids, positions, slot_mapping, slots, tables = [], [], [], [], []
        for s in scheduled:
            seq, p = s.seq, s.seq.num_computed
            table = seq.block_table
            ids += seq.token_ids(p, p + 1)
            positions.append(p)
            slot_mapping.append(table[p // bs] * bs + p % bs)
            slots.append(seq.slot)
            tables.append(table[: p // bs + 1])
        rank = max((self.lora.slot_rank[slot] for slot in slots if slot >= 0), default=0)
        return self.graphs.run(ids, positions, slot_mapping, slots, tables, rank, self.lora.layers_of(slots))

    def _row_slots(self, groups: dict[int, list[int]], rows: int) -> torch.Tensor:
        """[rows] int64 the slot of every row of the flat batch, -1 for base-only rows."""
        slots = [-1] * rows
        for slot, members in groups.items():
            for row in members:
                slots[row] = slot
        return self._tensor(slots)

    def _group_prefills(self, spans: list[PrefillSpan]) -> tuple[list[PrefillSpan], tuple[PrefillGroup, ...]]:
        """Spans with no cached prefix and a length some other such span shares go into one SDPA call each."""
        by_len: dict[int, list[PrefillSpan]] = {}
        for span in spans:
            if span.block_table is None:
                by_len.setdefault(span.num_tokens, []).append(span)
        shared = {n: group for n, group in by_len.items() if len(group) > 1}
        if not shared:
            return spans, ()
        groups = tuple(
            PrefillGroup(self._tensor([r for s in group for r in range(s.start, s.start + n)]), len(group), n)
            for n, group in shared.items()
        )
        rest = [s for s in spans if s.block_table is not None or s.num_tokens not in shared]
        return rest, groups

    def _decode_layout(self, tables: list[list[int]], lens: torch.Tensor | None):
        if not tables:
            return None, None
        nb = max(len(t) for t in tables)
        padded = self._tensor([t + [0] * (nb - len(t)) for t in tables])  # [B, nb]
        if self.cache.native or self.cache.paged:  # the kernels read the lengths; the mask is for SDPA
            return padded, None
        return padded, decode_mask(lens, nb * self.cache.block_size)

    def _tensor(self, values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=self.device)
