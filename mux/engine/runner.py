"""Builds one step's flat batch (all sequences' tokens in one row), runs the model, returns the logits to sample.

Per step the runner publishes the attention layout and the LoRA layout once; every layer reads them.
"""

from __future__ import annotations

import torch

from mux.engine.kv_cache import ATTN_IMPLEMENTATION, AttentionMetadata, KVCache, PrefillSpan
from mux.engine.scheduler import Scheduled
from mux.lora.layers import MultiLoRAModel
from mux.lora.ops import build_lora_batch


class ModelRunner:
    def __init__(self, model: torch.nn.Module, lora: MultiLoRAModel, cache: KVCache) -> None:
        self.model = model
        self.lora = lora
        self.cache = cache
        self.device = next(model.parameters()).device
        model.config._attn_implementation = ATTN_IMPLEMENTATION

    @torch.inference_mode()
    def run(self, scheduled: list[Scheduled]) -> torch.Tensor:
        """Forward the scheduled tokens; returns float32 logits [num_sampled, V] in `scheduled` order of sample=True."""
        # single-token sequences first (the attention layout), then by slot: each slot's rows form one run,
        # which the LoRA kernel serves in place when it is long enough
        order = sorted(scheduled, key=lambda s: (s.num_tokens != 1, s.seq.slot))
        bs = self.cache.block_size
        ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        groups: dict[int, list[int]] = {}
        sample_rows: dict[int, int] = {}  # seq_id -> row of its last token
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
            ctx = first + n
            if n == 1:
                decode_tables.append(table[: -(-ctx // bs)])
                decode_lens.append(ctx)
            else:
                prefix = self._tensor(table[: -(-ctx // bs)]) if first else None
                prefills.append(PrefillSpan(start, n, ctx, prefix))

        lens = self._tensor(decode_lens) if decode_lens else None  # [B]
        meta = AttentionMetadata(
            self.cache,
            self._tensor(slot_mapping),
            len(decode_lens),
            *self._decode_layout(decode_tables, lens),
            tuple(prefills),
            lens,
        )
        rank = max((self.lora.slot_rank[slot] for slot in groups), default=0)
        self.lora.ctx.batch = build_lora_batch(
            groups, rank, self.device, self.lora.dtype, slot_ranks=self.lora.slot_rank, use_native=self.lora.native
        )
        try:
            hidden = self.model.model(
                input_ids=self._tensor(ids)[None],
                position_ids=self._tensor(positions)[None],
                use_cache=False,
                mux_attn=meta,
            ).last_hidden_state[0]  # [T, hidden]
        finally:
            self.lora.ctx.batch = None
        rows = [sample_rows[s.seq.seq_id] for s in scheduled if s.sample]
        return self.model.lm_head(hidden[self._tensor(rows)]).float()  # [num_sampled, V]

    def _decode_layout(self, tables: list[list[int]], lens: torch.Tensor | None):
        if not tables:
            return None, None
        bs = self.cache.block_size
        nb = max(len(t) for t in tables)
        padded = self._tensor([t + [0] * (nb - len(t)) for t in tables])  # [B, nb]
        if self.cache.native:  # the C kernel reads the lengths; the mask is for SDPA
            return padded, None
        mask = torch.arange(nb * bs, device=self.device)[None, :] < lens[:, None]  # [B, L]
        return padded, mask[:, None, None, :]

    def _tensor(self, values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=self.device)
