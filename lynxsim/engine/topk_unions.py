"""Top-k expert unions of fixed blocks of a request's tokens, shared by every policy of a run.

Every policy of an experiment routes the same tokens (a token is a request and a position, and its router
logits do not depend on the batch), only grouped into different iterations. On iterations routed by top-k
(those with a prefill chunk, under a decode-only policy) the cost model needs each MoE layer's union of the
tokens' top-k experts, and a union is the union of the unions of any partition of the tokens. So a request's
positions are cut into aligned blocks of ``BLOCK_TOKENS``; the first policy to route a block keeps its per-layer
union (a bit per expert, packed), and every later iteration of any policy that covers the whole block reads it
instead of routing the block's tokens again. The tokens outside whole blocks (decode tokens, the ragged ends of
a chunk) are routed as before. The result is exactly the union of routing every token; only under expert
parallelism, where each expert's token count matters and not only its membership, is it not used.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

BLOCK_TOKENS = 64
"""Positions per block: a prefill chunk of hundreds of tokens is mostly whole blocks, and a block's union of a
48-layer, 128-expert model packs into 768 bytes."""


class TopKUnions:
    """Per (request, block) the packed per-layer union of its tokens' top-k experts."""

    def __init__(self, num_layers: int, num_experts: int) -> None:
        self.num_layers = num_layers
        self.num_experts = num_experts
        self._blocks: dict[tuple[int, int], np.ndarray] = {}

    def __len__(self) -> int:
        return len(self._blocks)

    def union(
        self,
        request_ids: np.ndarray,
        positions: np.ndarray,
        active_of: Callable[[np.ndarray, np.ndarray], np.ndarray],
    ) -> np.ndarray:
        """The per-layer union ``bool [layers, experts]`` of the tokens' top-k experts; ``active_of(ids,
        positions)`` routes tokens and returns their union. Stops as soon as every expert of every layer is in."""
        active = np.zeros((self.num_layers, self.num_experts), dtype=bool)
        loose_ids: list[np.ndarray] = []
        loose_positions: list[np.ndarray] = []
        for request, first, end in _runs(request_ids, positions):
            whole_from = -(-first // BLOCK_TOKENS)  # the whole blocks inside [first, end)
            whole_to = end // BLOCK_TOKENS
            if whole_to <= whole_from:
                edges = [np.arange(first, end)]
            else:
                edges = [np.arange(first, whole_from * BLOCK_TOKENS), np.arange(whole_to * BLOCK_TOKENS, end)]
            for edge in edges:
                loose_positions.append(edge)
                loose_ids.append(np.full(edge.size, request, dtype=np.int64))
            for block in range(whole_from, whole_to):
                active |= self._block(request, block, active_of)
                if active.all():
                    return active
        if loose_positions:
            active |= active_of(np.concatenate(loose_ids), np.concatenate(loose_positions))
        return active

    def _block(self, request: int, block: int, active_of: Callable[[np.ndarray, np.ndarray], np.ndarray]
               ) -> np.ndarray:
        """The union of one block, routed the first time any policy needs it."""
        packed = self._blocks.get((request, block))
        if packed is not None:
            return np.unpackbits(packed, axis=1, count=self.num_experts).astype(bool)
        start = block * BLOCK_TOKENS
        mask = active_of(np.full(BLOCK_TOKENS, request, dtype=np.int64), np.arange(start, start + BLOCK_TOKENS))
        self._blocks[(request, block)] = np.packbits(mask, axis=1)
        return mask


def _runs(request_ids: np.ndarray, positions: np.ndarray) -> list[tuple[int, int, int]]:
    """(request, first position, end position) of each run of one request's consecutive tokens, in order."""
    breaks = np.flatnonzero((np.diff(request_ids) != 0) | (np.diff(positions) != 1)) + 1
    starts = np.concatenate([[0], breaks]).astype(np.int64)
    ends = np.concatenate([breaks, [request_ids.size]]).astype(np.int64)
    return [
        (int(request_ids[s]), int(positions[s]), int(positions[e - 1]) + 1)
        for s, e in zip(starts, ends, strict=True)
    ]
