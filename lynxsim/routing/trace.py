"""A recorded routing trace in memory: router logits of real tokens of real sequences, per MoE layer.

Everything that consumes recorded routing (replay in the simulator, fitting the synthetic generator, comparing
the two) works on this one structure, whatever file format the trace came from.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RoutingTrace:
    """``logits[l, t, e]``: router logit of expert ``e`` for token ``t`` at MoE layer ``l``.

    Token ``t`` is position ``positions[t]`` of sequence ``sequence_ids[t]``; the tokens of a sequence appear in
    position order. ``recorded_top_k`` is set when the source kept only each token's top-k probabilities: the
    other logits were then filled in by ``fill`` (see ``lynxsim.routing.trace_format``), and only the top-k
    entries of each token are real.
    """

    name: str
    source: str
    logits: np.ndarray  # float32 [layers, tokens, experts]
    sequence_ids: np.ndarray  # int64 [tokens]
    positions: np.ndarray  # int64 [tokens]
    layer_ids: tuple[int, ...]  # the model's own index of each MoE layer
    recorded_top_k: int | None = None
    fill: str | None = None
    license: str = ""  # the recording's licence, carried into every file written from this trace
    model: str = ""  # the model (and checkpoint) the router outputs come from
    notes: str = ""  # provenance that fits nowhere else: which rows of which upstream files, the token layout

    def __post_init__(self) -> None:
        if self.logits.ndim != 3:
            raise ValueError(f"logits must be [layers, tokens, experts], got shape {self.logits.shape}")
        layers, tokens, _ = self.logits.shape
        if self.sequence_ids.shape != (tokens,) or self.positions.shape != (tokens,):
            raise ValueError("sequence_ids and positions need one entry per token")
        if len(self.layer_ids) != layers:
            raise ValueError(f"layer_ids names {len(self.layer_ids)} layers, logits hold {layers}")

    @property
    def num_layers(self) -> int:
        return int(self.logits.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.logits.shape[1])

    @property
    def num_experts(self) -> int:
        return int(self.logits.shape[2])

    def sequences(self) -> list[np.ndarray]:
        """Token indices of each sequence, in position order (sequences in order of first appearance).

        One stable sort of all tokens (O(T log T)), so a trace of many short sequences costs no more than one
        long one.
        """
        _, first, inverse = np.unique(self.sequence_ids, return_index=True, return_inverse=True)
        appearance = np.empty_like(first)
        appearance[np.argsort(first, kind="stable")] = np.arange(first.size)
        key = appearance[inverse.reshape(-1)]
        order = np.lexsort((self.positions, key))
        return np.split(order, np.cumsum(np.bincount(key, minlength=first.size))[:-1])
