"""The paged KV cache: a pool of fixed-size blocks, counted rather than tracked one by one.

Which physical block a request holds never changes a latency in this simulator, so the pool is a counter; what
matters is when it runs out, since that is what forces preemption.
"""

from __future__ import annotations

from simpy_oracle.request import Request


class BlockPool:
    def __init__(self, num_blocks: int, block_size_tokens: int) -> None:
        if num_blocks <= 0:
            raise ValueError("the KV cache has no blocks")
        self.num_blocks = num_blocks
        self.block_size_tokens = block_size_tokens
        self.free_blocks = num_blocks

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size_tokens)

    def try_grow(self, request: Request, tokens: int) -> bool:
        """Give ``request`` enough blocks to cache ``tokens`` tokens; False (and no change) if the pool is short."""
        extra = -(-tokens // self.block_size_tokens) - request.num_blocks  # blocks_for(tokens), inlined (hot)
        if extra > self.free_blocks:
            return False
        if extra > 0:
            self.free_blocks -= extra
            request.num_blocks += extra
        return True

    def release(self, request: Request) -> None:
        self.free_blocks += request.num_blocks
        request.num_blocks = 0

    def take_over(self, request: Request) -> int:
        """Detach ``request``'s blocks from it (they stay allocated here) and return their count, so that the
        request can allocate blocks in another pool; ``free`` gives them back later."""
        blocks, request.num_blocks = request.num_blocks, 0
        return blocks

    def free(self, blocks: int) -> None:
        self.free_blocks += blocks

    @property
    def used_fraction(self) -> float:
        return 1.0 - self.free_blocks / self.num_blocks
