"""KV block bookkeeping (no torch): a free list of fixed-size blocks, per-sequence block tables, and the
prefix cache (vLLM's automatic prefix caching).

With the prefix cache, a block whose tokens are all computed is registered under a digest of everything that
decided its K/V: the tenant, the adapter's exact weights (its key), and every token up to the block's end (a
chain: each digest covers the one before). A new sequence whose first full blocks match takes those blocks
(reference-counted) and starts its prefill after them. A registered block nobody holds stays cached, and
is reused, oldest released first, only when no plain free block is left. So a cached block is free space:
`num_free` counts it.

Only full blocks are shared, and a sequence only writes past the blocks it took, so a shared block is never
written. At least one token is always left to compute (the next token's logits need it), and a sequence that
wants prompt logprobs computes its whole prompt. Digests are SHA-256: a Python `hash` collision between
tenants would hand one tenant's K/V to another's request. Blocks are shared only within a tenant, so one
tenant's time to first token tells nothing about another's prompts.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from mux.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self._free = list(range(num_blocks - 1, -1, -1))  # blocks holding nothing worth keeping
        self._refs = [0] * num_blocks  # sequences holding each block
        self._digest_of: dict[int, bytes] = {}  # registered block -> its digest
        self._cached: dict[bytes, int] = {}  # digest -> registered block
        self._idle: OrderedDict[int, None] = OrderedDict()  # registered blocks nobody holds, released first first
        self.queried_tokens = 0  # prompt tokens looked up in the prefix cache (vLLM's prefix_cache_queries)
        self.hit_tokens = 0  # of those, found cached (prefix_cache_hits)

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._idle)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    # ---- the prefix cache -------------------------------------------------------------------
    def cached_prefix(self, seq: Sequence) -> list[int]:
        """The cached blocks a not yet started `seq` can take: its longest registered chain of full blocks that
        leaves at least one token to compute ([] without the cache, or for prompt logprobs)."""
        if not self.prefix_caching or seq.block_table or seq.params.prompt_logprobs is not None:
            return []
        hit = []
        for i in range((seq.num_tokens - 1) // self.block_size):
            block = self._cached.get(self._digest(seq, i))
            if block is None:
                break
            hit.append(block)
        return hit

    def commit(self, seq: Sequence) -> None:
        """Register `seq`'s blocks that its computed tokens have filled (after each step that ran it)."""
        if not self.prefix_caching:
            return
        for i in range(seq.num_registered, seq.num_computed // self.block_size):
            digest, block = self._digest(seq, i), seq.block_table[i]
            if digest not in self._cached:  # else the same tokens were computed twice at once: keep the first
                self._cached[digest] = block
                self._digest_of[block] = digest
        seq.num_registered = max(seq.num_registered, seq.num_computed // self.block_size)

    def reset_prefix_cache(self) -> int:
        """Forget every registered block (vLLM's reset_prefix_cache): the idle ones become plain free blocks, the
        held ones stay with their sequences, unshared from now on. Returns how many blocks were forgotten."""
        forgotten = len(self._cached)
        self._free.extend(self._idle)
        self._idle.clear()
        self._cached.clear()
        self._digest_of.clear()
        return forgotten

    def _digest(self, seq: Sequence, i: int) -> bytes:
        """Digest of `seq`'s block i (the tokens are fixed once they exist, so each is computed once)."""
        hashes, bs = seq.block_hashes, self.block_size
        while len(hashes) <= i:
            j = len(hashes)
            h = hashlib.sha256(hashes[-1] if hashes else _root(seq))
            h.update(array("q", seq.token_ids(j * bs, (j + 1) * bs)).tobytes())
            hashes.append(h.digest())
        return hashes[i]

    # ---- allocation ---------------------------------------------------------------------------
    def blocks_needed(self, seq: Sequence, num_tokens: int, hit: list[int] = ()) -> int:
        """Extra blocks `seq` needs to hold `num_tokens` more tokens of KV (after the cached blocks `hit`)."""
        total = -(-(seq.num_computed + len(hit) * self.block_size + num_tokens) // self.block_size)
        return max(0, total - len(seq.block_table) - len(hit))

    def can_allocate(self, seq: Sequence, num_tokens: int, hit: list[int] = ()) -> bool:
        idle_hits = sum(self._refs[b] == 0 for b in hit)  # taking these uses up free space too
        return self.blocks_needed(seq, num_tokens, hit) + idle_hits <= self.num_free

    def allocate(self, seq: Sequence, num_tokens: int, hit: list[int] = ()) -> None:
        """Give `seq` blocks for `num_tokens` more tokens; a sequence not yet started first takes the cached
        blocks `hit` (from cached_prefix) and counts their tokens as computed."""
        if not seq.block_table:  # an admission (a new sequence, or a preempted one again)
            for block in hit:
                self._refs[block] += 1
                self._idle.pop(block, None)
            seq.block_table.extend(hit)
            seq.num_computed, seq.num_registered = len(hit) * self.block_size, len(hit)
            if not seq.output_ids:
                seq.num_cached = seq.num_computed
            if self.prefix_caching and seq.params.prompt_logprobs is None:
                self.queried_tokens += seq.num_tokens
                self.hit_tokens += seq.num_computed
        else:
            assert not hit, "cached blocks are taken only at admission"
        for _ in range(self.blocks_needed(seq, num_tokens)):
            block = self._take()
            self._refs[block] = 1
            seq.block_table.append(block)

    def _take(self) -> int:
        if self._free:
            return self._free.pop()
        block, _ = self._idle.popitem(last=False)  # the cached block released longest ago
        del self._cached[self._digest_of.pop(block)]
        return block

    def free(self, seq: Sequence) -> None:
        """Release `seq`'s blocks, last first (so a chain's tail is reused before its head)."""
        for block in reversed(seq.block_table):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in self._digest_of:
                    self._idle[block] = None
                else:
                    self._free.append(block)
        seq.block_table.clear()
        seq.num_computed = seq.num_registered = 0


def _root(seq: Sequence) -> bytes:
    """What a chain's first digest starts from: who may share the blocks, and the adapter's exact weights."""
    key = seq.adapter.key if seq.adapter is not None else ""
    return f"{seq.tenant or ''}\0{key}".encode()
