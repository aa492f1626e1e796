"""Decode steps replayed from captured CUDA graphs (vLLM's and gpt-fast's answer to per-kernel launch cost).

One decode step of a 7B model is thousands of small kernels; launched one by one from Python they take longer
than the GPU takes to run them (`bench/gpu_check.py` measures eager against graphs). A graph is captured per
(padded batch, padded block-table width, LoRA rank, any adapter, the linears the adapters target) the first
time a step needs it, and replayed for every later step of that shape: the step's inputs are copied into the
graph's own input buffer, one copy.
Shapes are static by padding: the batch to a power of two, its pad rows writing token 0 into the KV cache's
scratch block and using no adapter; block tables to a power-of-two width with the scratch block; LoRA rows in
the per-token layout (`mux/lora/ops.py`). Steps with prefill rows or more sequences than the largest graph run
eagerly. With `capture=False` the same padded forward runs eagerly: tests check it on the CPU.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from mux.engine.kv_cache import AttentionMetadata, KVCache, decode_mask
from mux.lora.layers import MultiLoRAModel
from mux.lora.ops import per_token_batch

log = logging.getLogger(__name__)
_FIELDS = 5  # per row of the packed input: token id, position, cache row, length, LoRA slot; then the table
MAX_GRAPHS = 64  # each keeps its own [P, V] logits; steps of a shape past this many run eagerly


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@dataclass(slots=True)
class _Graph:
    inputs: torch.Tensor  # [P * (5 + W)] int64: ids, positions, cache rows, lengths, slots, tables [P, W]
    logits: torch.Tensor | None  # [P, V] float32, written by each replay (None when not captured)
    graph: torch.cuda.CUDAGraph | None
    forward: Callable[[], torch.Tensor]  # the padded forward, run eagerly when not captured


class DecodeGraphs:
    def __init__(
        self, model: torch.nn.Module, lora: MultiLoRAModel, cache: KVCache, max_batch: int, capture: bool = True
    ) -> None:
        self.model, self.lora, self.cache = model, lora, cache
        self.max_batch = _pow2(max_batch)
        self.device = next(model.parameters()).device
        self.capture = capture
        self.enabled = True  # turned off for good if a capture fails
        self._graphs: dict[tuple, _Graph] = {}  # (batch, table width, rank, lora, layers) -> its graph
        self._pool = None  # one memory pool for all graphs: they never run at once

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def takes(self, scheduled) -> bool:
        """Whether this step is pure decode (one sampled token per sequence) and fits the largest graph."""
        decode = all(s.num_tokens == 1 and s.sample for s in scheduled)
        return self.enabled and decode and len(scheduled) <= self.max_batch

    def run(self, ids, positions, cache_rows, slots, tables, rank: int, layers=None) -> torch.Tensor | None:
        """Lists of one entry per sequence (tables: its block table up to its new token); layers: the wrapped
        linears the slots target (None: all). -> logits [B, V], or None when the graph could not be captured or
        MAX_GRAPHS are (the caller runs the step eagerly)."""
        b = len(ids)
        lora = any(slot >= 0 for slot in slots)
        key = (_pow2(b), _pow2(max(map(len, tables))), _pow2(rank) if lora else 0, lora, layers if lora else None)
        graph = self._graphs.get(key)
        if graph is None:
            if len(self._graphs) >= MAX_GRAPHS:
                return None
            graph = self._build(*key)
            if graph is None:
                return None
            self._graphs[key] = graph
        p, width = key[0], key[1]
        pad, scratch = p - b, self.cache.scratch_block
        packed = [*ids, *[0] * pad, *positions, *[0] * pad]
        packed += [*cache_rows, *[scratch * self.cache.block_size] * pad, *[q + 1 for q in positions], *[1] * pad]
        packed += [*slots, *[-1] * pad]
        for table in tables:
            packed += table + [scratch] * (width - len(table))
        packed += [scratch] * (width * pad)
        graph.inputs.copy_(torch.tensor(packed, dtype=torch.int64), non_blocking=True)
        if graph.graph is None:
            return graph.forward()[:b]
        graph.graph.replay()
        return graph.logits[:b]  # overwritten by the next replay: the step consumes it first

    def _build(self, p: int, width: int, rank: int, lora: bool, layers: frozenset[int] | None) -> _Graph | None:
        inputs = torch.zeros(p * (_FIELDS + width), dtype=torch.int64, device=self.device)
        inputs[2 * p : 3 * p] = self.cache.scratch_block * self.cache.block_size  # all pads until the first copy
        inputs[3 * p : 4 * p] = 1
        inputs[4 * p : 5 * p] = -1
        inputs[5 * p :] = self.cache.scratch_block
        ids, positions, rows, lens, slots = inputs[: _FIELDS * p].view(_FIELDS, p)
        tables = inputs[_FIELDS * p :].view(p, width)

        def forward() -> torch.Tensor:
            sdpa = not (self.cache.native or self.cache.paged)  # SDPA over the gathered blocks needs a mask
            mask = decode_mask(lens, width * self.cache.block_size) if sdpa else None
            meta = AttentionMetadata(self.cache, rows, p, tables, mask, (), lens)
            self.lora.ctx.batch = per_token_batch(slots, rank, layers) if lora else None
            try:
                out = self.model.model(
                    input_ids=ids[None], position_ids=positions[None], use_cache=False, mux_attn=meta
                )
            finally:
                self.lora.ctx.batch = None
            return self.model.lm_head(out.last_hidden_state[0]).float()  # [P, V]

        if not self.capture:
            return _Graph(inputs, None, None, forward)
        try:
            return self._capture(p, inputs, forward)
        except Exception:  # any failure: the eager path still serves
            self.enabled = False
            log.exception("CUDA graph capture failed for batch %d; decode steps run eagerly from now on", p)
            return None

    def _capture(self, p: int, inputs: torch.Tensor, forward) -> _Graph:
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            forward()  # warm-up outside the capture: Triton compiles, cuBLAS picks its kernels
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            logits = forward()
        self._pool = graph.pool()
        log.info("captured a decode graph for batch %d (%d graphs)", p, len(self._graphs) + 1)
        return _Graph(inputs, logits, graph, forward)
