"""BlockPool: the paged KV cache's bookkeeping, without tensors. The cache is `num_blocks` blocks of `block_size`
positions; each request holds its blocks in a list of its own (`Request.blocks`), in position order, enough for the
tokens it has cached so far."""

from __future__ import annotations

import heapq


class BlockPool:
    """Hands out fixed-size KV-cache blocks, and takes them back.

    `grow(blocks, n_tokens)` extends a request's block list to hold n_tokens positions (all or nothing), `free(blocks)`
    empties it back into the pool. The lowest free blocks are handed out first, so the blocks in use stay packed at
    the start of the cache: its pages become resident only when written (kv_cache.py), and memory in use then
    follows the most blocks ever held at once, not the number of requests served."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"a block pool needs blocks and positions per block, got {num_blocks} x {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free: list[int] = list(range(num_blocks))  # a heap

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, n_tokens: int) -> int:
        """Blocks that hold n_tokens positions."""
        return -(-n_tokens // self.block_size)

    def grow(self, blocks: list[int], n_tokens: int) -> bool:
        """Make `blocks` hold n_tokens positions; False (and nothing taken) when the pool is too short."""
        more = self.blocks_for(n_tokens) - len(blocks)
        if more > len(self._free):
            return False
        blocks.extend(heapq.heappop(self._free) for _ in range(max(more, 0)))
        return True

    def free(self, blocks: list[int]) -> int:
        """Return all of `blocks` to the pool and empty the list; how many."""
        n = len(blocks)
        for block in blocks:
            heapq.heappush(self._free, block)
        blocks.clear()
        return n
