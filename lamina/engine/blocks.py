"""BlockPool: the paged KV cache's bookkeeping, without tensors. The cache is `num_blocks` blocks of `block_size`
positions; each request holds its blocks in a list of its own (`Request.blocks`), in position order, enough for the
tokens it has cached so far.

Prefix caching (vLLM's automatic prefix caching): a block whose positions are all computed can be published under a
key that names everything before and in it (`block_keys`: its tokens and the key of the block before it), and a
later request whose tokens begin the same way takes the published blocks instead of computing them again. Blocks
are reference-counted: a block several requests read is free only when the last lets go, and a free block keeps
what it caches (it can still be matched) until the pool needs room, least recently used first."""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Sequence

BlockKey = int  # hash((key of the block before, its tokens)); the tokens are compared too (see BlockPool.match)


def block_keys(tokens: Sequence[int], block_size: int, keys: list[BlockKey]) -> list[BlockKey]:
    """Extend `keys` (the keys of `tokens`' first full blocks, from an earlier call, or empty) to every full block of
    `tokens`; returns `keys`. A key names the block's tokens and, through its parent's key, all tokens before."""
    for i in range(len(keys), len(tokens) // block_size):
        parent = keys[i - 1] if i else None
        keys.append(hash((parent, tuple(tokens[i * block_size : (i + 1) * block_size]))))
    return keys


class BlockPool:
    """Hands out fixed-size KV-cache blocks, takes them back, and (with `caching`) remembers what they hold.

    `grow(blocks, n_tokens)` extends a request's block list to hold n_tokens positions (all or nothing), `free(blocks)`
    lets go of all of them. Never-cached free blocks are handed out lowest first, so the blocks in use stay packed at
    the start of the cache (its pages become resident only when written, kv_cache.py); only then are cached free
    blocks evicted, least recently used first. `match(keys, tokens)` takes the cached blocks that begin a sequence,
    `publish(block, key, tokens)` caches a computed block."""

    def __init__(self, num_blocks: int, block_size: int, *, caching: bool = False):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"a block pool needs blocks and positions per block, got {num_blocks} x {block_size}")
        self.num_blocks, self.block_size, self.caching = num_blocks, block_size, caching
        self._free: list[int] = list(range(num_blocks))  # a heap of free blocks that cache nothing
        self._evictable: OrderedDict[int, None] = OrderedDict()  # free blocks that cache a prefix, oldest use first
        self._refs = [0] * num_blocks
        self._cached: dict[BlockKey, int] = {}  # key -> the block that holds it
        self._content: dict[int, tuple[BlockKey, tuple[int, ...]]] = {}  # cached block -> its key and tokens
        self.queries = self.hits = 0  # tokens looked up in the cache, and found there (for metrics)

    @property
    def num_free(self) -> int:
        """Blocks no request holds (cached ones included: they are handed out when needed)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        """Blocks holding a published prefix, in use or free."""
        return len(self._content)

    def blocks_for(self, n_tokens: int) -> int:
        """Blocks that hold n_tokens positions."""
        return -(-n_tokens // self.block_size)

    def grow(self, blocks: list[int], n_tokens: int) -> bool:
        """Make `blocks` hold n_tokens positions; False (and nothing taken) when the pool is too short."""
        more = self.blocks_for(n_tokens) - len(blocks)
        if more > self.num_free:
            return False
        for _ in range(max(more, 0)):
            if self._free:
                block = heapq.heappop(self._free)
            else:  # evict the least recently used cached block
                block, _ = self._evictable.popitem(last=False)
                key, _ = self._content.pop(block)
                del self._cached[key]
            self._refs[block] = 1
            blocks.append(block)
        return True

    def free(self, blocks: list[int]) -> int:
        """Let go of all of `blocks` and empty the list; how many. A block other requests still read stays theirs;
        a cached one stays matchable until evicted (the last blocks of a sequence go first: they are the least
        likely to be shared)."""
        n = len(blocks)
        for block in reversed(blocks):
            self._refs[block] -= 1
            assert self._refs[block] >= 0, f"block {block} freed more often than taken"
            if self._refs[block] == 0:
                if block in self._content:
                    self._evictable[block] = None
                else:
                    heapq.heappush(self._free, block)
        blocks.clear()
        return n

    def match(self, keys: Sequence[BlockKey], tokens: Sequence[int], limit: int) -> list[int]:
        """The cached blocks that hold the first of `keys` in order (at most `limit` blocks), each taken for the
        caller (free them like grown ones). `tokens` are the sequence's, checked against each block's so that a
        hash collision can never hand out the wrong keys and values."""
        found: list[int] = []
        if not self.caching:
            return found
        bs = self.block_size
        for i, key in enumerate(keys[:limit]):
            block = self._cached.get(key)
            if block is None or self._content[block][1] != tuple(tokens[i * bs : (i + 1) * bs]):
                break
            found.append(block)
        for block in found:
            if self._refs[block] == 0:
                del self._evictable[block]
            self._refs[block] += 1
        return found

    def count_query(self, queried: int, hit: int) -> None:
        """Record a lookup of `queried` tokens of which `hit` were found (Prometheus counters)."""
        self.queries += queried
        self.hits += hit

    def publish(self, block: int, key: BlockKey, tokens: Sequence[int]) -> None:
        """Cache block `block` (held by the caller, every position computed) under `key`. A key already cached
        keeps its block (this one stays private to its request)."""
        if self.caching and key not in self._cached and block not in self._content:
            self._cached[key] = block
            self._content[block] = (key, tuple(tokens))
