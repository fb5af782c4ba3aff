"""BlockPool: the paged KV cache's bookkeeping, without tensors. The cache is `num_blocks` blocks of `block_size`
positions; each request holds a table of blocks, in order, enough for the tokens it has cached so far."""

from __future__ import annotations

from collections import deque
from typing import Hashable


class BlockPool:
    """Hands out fixed-size KV-cache blocks to requests, and takes them back.

    `reserve(owner, n_tokens)` grows the owner's table to hold n_tokens positions (all or nothing), `release(owner)`
    returns its blocks. Blocks come back to the end of the free list, so recently freed memory is reused last."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"a block pool needs blocks and positions per block, got {num_blocks} x {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._tables: dict[Hashable, list[int]] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, n_tokens: int) -> int:
        """Blocks that hold n_tokens positions."""
        return -(-n_tokens // self.block_size)

    def table(self, owner: Hashable) -> list[int]:
        """The owner's blocks, in position order (empty for an owner that holds none)."""
        return self._tables.get(owner, [])

    def can_reserve(self, owner: Hashable, n_tokens: int) -> bool:
        return self.blocks_for(n_tokens) - len(self.table(owner)) <= len(self._free)

    def reserve(self, owner: Hashable, n_tokens: int) -> bool:
        """Make the owner's table hold n_tokens positions; False (and nothing taken) when the pool is too short."""
        table = self._tables.setdefault(owner, [])
        more = self.blocks_for(n_tokens) - len(table)
        if more > len(self._free):
            if not table:
                del self._tables[owner]
            return False
        table.extend(self._free.popleft() for _ in range(max(more, 0)))
        return True

    def release(self, owner: Hashable) -> int:
        """Return all the owner's blocks to the pool; how many."""
        table = self._tables.pop(owner, [])
        self._free.extend(table)
        return len(table)
