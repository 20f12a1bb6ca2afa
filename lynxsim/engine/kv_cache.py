"""An instance's paged KV cache: ``num_blocks`` blocks of ``block_size_tokens`` tokens each.

Which physical block a request holds never changes a latency in this simulator, so the engine counts blocks
rather than tracking them (``lynxsim.engine.compiled.kernel``: free blocks, each request's blocks); what matters is
when the cache runs out, since that is what forces preemption. This is the cache's size, which a scheduler is
made with.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BlockPool:
    num_blocks: int
    block_size_tokens: int

    def __post_init__(self) -> None:
        if self.num_blocks <= 0:
            raise ValueError("the KV cache has no blocks")
        if self.block_size_tokens <= 0:
            raise ValueError("a KV-cache block holds at least one token")

    def blocks_for(self, tokens: int) -> int:
        """Blocks that cache ``tokens`` tokens."""
        return -(-tokens // self.block_size_tokens)
