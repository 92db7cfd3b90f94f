"""Automatic prefix caching: prefilled K/V kept by content for reuse.

A prompt's tokens are cut into fixed-size blocks; block i is keyed by a hash
chain over blocks 0..i (so a key names the whole prefix, not just its block),
salted by what else decides the K/V (the model and the KV dtype). A joining
query copies its longest cached chain of full blocks into its pool entry and is
prefilled from there; after its prefill (and when it finishes, prompt plus
generated tokens, for the next turn of a chat) its blocks are copied in.

Memory: every block is charged to the engine's KV budget, and the cache holds at
most `capacity` bytes of it. It gives way first: the budget asks it to evict
(least recently used blocks first) whenever a reservation would not fit
otherwise, so a query never waits or is refused for the cache's sake.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

import torch

from .budget import KVBudget, KVSpec

DEFAULT_BLOCK_SIZE = 16


@dataclass(eq=False)
class _Block:
    parent: Optional[int]
    tokens: tuple
    k: torch.Tensor  # [layers, kv_heads, block, head_dim]
    v: torch.Tensor


@dataclass
class PrefixCacheStats:
    queries: int = 0        # lookups
    query_hits: int = 0     # lookups that reused at least one block
    tokens: int = 0         # prompt tokens looked up (that could have been reused)
    token_hits: int = 0     # of those, reused
    evictions: int = 0      # blocks evicted
    inserted: int = 0       # blocks inserted


class PrefixCache:
    def __init__(self, spec: KVSpec, budget: KVBudget, capacity: int, block_size: int = DEFAULT_BLOCK_SIZE,
                 salt: str = ""):
        if block_size < 1:
            raise ValueError(f"prefix cache block size must be >= 1; got {block_size}")
        self.spec, self.budget, self.capacity, self.block_size = spec, budget, int(capacity), block_size
        self.salt = hash((salt, str(spec.dtype), spec.num_layers, spec.num_kv_heads, spec.head_dim))
        self.block_bytes = block_size * spec.slot_bytes
        self.blocks: "OrderedDict[int, _Block]" = OrderedDict()  # key -> block, least recently used first
        self.stats = PrefixCacheStats()
        budget.reclaimers.append(self.reclaim)

    @property
    def nbytes(self) -> int:
        return len(self.blocks) * self.block_bytes

    def _keys(self, tokens: list[int], limit: int):
        """(key, parent key, block tokens) of the full blocks within tokens[:limit]."""
        B, parent = self.block_size, self.salt
        for i in range(limit // B):
            block = tuple(tokens[i * B:(i + 1) * B])
            key = hash((parent, block))
            yield key, parent, block
            parent = key

    def lookup(self, tokens: list[int], limit: int) -> list[_Block]:
        """The longest chain of cached blocks that is a prefix of tokens[:limit]."""
        found = []
        for key, parent, block in self._keys(tokens, limit):
            b = self.blocks.get(key)
            if b is None or b.parent != parent or b.tokens != block:  # absent, or a hash collision
                break
            found.append(b)
        self._touch(tokens, len(found))
        st = self.stats
        st.queries += 1
        st.tokens += limit
        st.query_hits += bool(found)
        st.token_hits += len(found) * self.block_size
        return found

    def copy_into(self, blocks: list[_Block], kv, row: int = 0) -> int:
        """Write the blocks' K/V into columns 0.. of `row` of a ShapedKV; returns
        the number of tokens written."""
        B = self.block_size
        for i, b in enumerate(blocks):
            for layer, (kl, vl) in enumerate(zip(kv.k, kv.v)):
                kl[row, :, i * B:(i + 1) * B] = b.k[layer]
                vl[row, :, i * B:(i + 1) * B] = b.v[layer]
        return len(blocks) * B

    def insert(self, tokens: list[int], kv, row: int, length: int) -> None:
        """Make the full blocks of tokens[:length], whose K/V are in `row` of `kv`,
        available to later queries: only what is not cached yet is copied, within
        the cache's capacity and the budget's free bytes (never evicting a block of
        the same chain, and never taking what a query could use)."""
        B, chain = self.block_size, set()
        L, H, D = self.spec.num_layers, self.spec.num_kv_heads, self.spec.head_dim
        for i, (key, parent, block) in enumerate(self._keys(tokens, length)):
            chain.add(key)
            b = self.blocks.get(key)
            if b is not None:
                if b.parent != parent or b.tokens != block:
                    return  # a collision: stop here rather than alias two prefixes
                continue
            while self.nbytes + self.block_bytes > self.capacity and self._evict_one(keep=chain):
                pass
            if self.nbytes + self.block_bytes > self.capacity or not self.budget.fits(self.block_bytes,
                                                                                         reclaim=False):
                return
            self.budget.take(self.block_bytes)
            k = torch.empty(L, H, B, D, dtype=self.spec.dtype, device=self.spec.device)
            v = torch.empty_like(k)
            for layer, (kl, vl) in enumerate(zip(kv.k, kv.v)):
                k[layer] = kl[row, :, i * B:(i + 1) * B]
                v[layer] = vl[row, :, i * B:(i + 1) * B]
            self.budget.allocated(self.block_bytes)
            self.budget.cache_bytes += self.block_bytes
            self.blocks[key] = _Block(parent, block, k, v)
            self.stats.inserted += 1
        self._touch(tokens, len(chain))

    def _touch(self, tokens: list[int], n: int) -> None:
        """Mark a chain's first n blocks most recently used, the first block last:
        eviction then takes a chain from its end, never orphaning its tail."""
        keys = [key for key, _, _ in self._keys(tokens, n * self.block_size)]
        for key in reversed(keys):
            if key in self.blocks:
                self.blocks.move_to_end(key)

    def _evict_one(self, keep=()) -> bool:
        for key in self.blocks:
            if key not in keep:
                self.blocks.pop(key)
                self.budget.cache_bytes -= self.block_bytes
                self.budget.allocated(-self.block_bytes)
                self.budget.give(self.block_bytes)
                self.stats.evictions += 1
                return True
        return False

    def reclaim(self, nbytes: int) -> None:
        """The budget needs `nbytes` more free: give back least recently used blocks
        until it has them (or the cache is empty). A block some query is copying
        from stays alive (it holds a reference) until that copy is done."""
        while self.blocks and not self.budget.fits(nbytes, reclaim=False):
            self._evict_one()
