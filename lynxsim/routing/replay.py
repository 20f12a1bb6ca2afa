"""Replay of a recorded routing trace as the simulator's routing source.

Real routing persists along a sequence: a token's experts depend on its context, so consecutive decode steps of
one request reuse experts more often than unrelated tokens do, and that changes how many distinct experts a
batch activates. Replay keeps it by letting every simulated request walk one recorded sequence in order.

Mapping, for request ``r`` at position ``p`` (any int64 values):

* sequence: ``perm[r mod S]``, ``perm`` a seeded permutation of the trace's ``S`` sequences, so consecutive
  request ids spread evenly over the sequences and a different seed gives a different assignment;
* start offset: ``o_r = hash(seed, r) mod n``, ``n`` the sequence's length, so that two requests on one
  sequence (``S`` is small: 8 for the FLAME-MoE sample) do not replay identical tokens side by side;
* recorded token: the ``(o_r + p) mod n``-th token of that sequence in position order.

Wrap-around: a request longer than what remains of its sequence after ``o_r`` goes on from the sequence's first
token, so its routing jumps once every ``n`` positions (from the last recorded token to the first, as between
two unrelated tokens) and repeats with period ``n``. Recordings are short (256 tokens per sequence for the
FLAME-MoE sample, where prompts of the Azure traces average 1,155 to 2,048 tokens), so most requests wrap: the
persistence replay reproduces is that of tokens up to ``n`` apart.

Layers: a simulated model has its own number of MoE layers. Simulated MoE layer ``i`` of ``M`` uses trace layer
``i * T // M`` of the trace's ``T`` (``layer_map``): the identity when ``M == T``; an even subsample of the
trace's layers when ``M < T``; each trace layer repeated ``M / T`` times, in order, when ``M > T`` (repeated
layers then route identically, which overstates cross-layer correlation but not any one layer's statistics).
Expert counts cannot be mapped: a trace of 64 experts cannot route a model of 128, so they must match.

Each call is index arithmetic plus one gather from a table prepared once, and a token's logits depend only on
(seed, request id, position), never on the rest of the batch.
"""

from __future__ import annotations

import numpy as np

from lynxsim.routing.hashing import combine, derive_key
from lynxsim.routing.trace import RoutingTrace

_PERMUTATION_STREAM = 1
_OFFSET_STREAM = 2


def layer_map(model_layers: int, trace_layers: int) -> np.ndarray:
    """int64 ``[model_layers]``: the trace layer each simulated MoE layer replays, ``i * trace_layers //
    model_layers``."""
    if model_layers < 1 or trace_layers < 1:
        raise ValueError(f"layer counts must be >= 1, got model {model_layers} and trace {trace_layers}")
    return np.arange(model_layers, dtype=np.int64) * trace_layers // model_layers


class TraceReplayRouting:
    """``RoutingSource`` that replays ``trace``: each request follows one recorded sequence (module docstring).

    ``num_moe_layers`` is the simulated model's MoE layer count (default: the trace's), mapped onto the trace's
    layers by ``layer_map``; ``num_experts``, when given, must equal the trace's (``ValueError`` otherwise).
    """

    def __init__(
        self,
        trace: RoutingTrace,
        *,
        seed: int,
        num_moe_layers: int | None = None,
        num_experts: int | None = None,
    ) -> None:
        if num_experts is not None and num_experts != trace.num_experts:
            raise ValueError(
                f"trace {trace.name!r} routes {trace.num_experts} experts per layer, the model has {num_experts}; "
                "replay needs the same expert count"
            )
        if trace.num_tokens == 0:
            raise ValueError(f"trace {trace.name!r} holds no tokens")
        self.num_moe_layers = trace.num_layers if num_moe_layers is None else num_moe_layers
        self.num_experts = trace.num_experts
        self.seed = seed
        self.trace = trace
        self.layer_map = layer_map(self.num_moe_layers, trace.num_layers)
        identity = self.num_moe_layers == trace.num_layers
        # Gathered per simulated layer once, so that a call is a single gather along the token axis.
        self._logits = np.ascontiguousarray(trace.logits if identity else trace.logits[self.layer_map],
                                            dtype=np.float32)

        sequences = trace.sequences()
        lengths = np.array([s.size for s in sequences], dtype=np.int64)
        # tokens[s, j]: trace token at the j-th position of sequence s (rows padded past their length, unused).
        self._tokens = np.zeros((len(sequences), int(lengths.max())), dtype=np.int64)
        for row, token_ids in zip(self._tokens, sequences, strict=True):
            row[: token_ids.size] = token_ids
        self._lengths = lengths
        self._permutation = np.argsort(
            combine(derive_key(seed, _PERMUTATION_STREAM), np.arange(len(sequences), dtype=np.int64)), kind="stable"
        )
        self._offset_key = derive_key(seed, _OFFSET_STREAM)

    @property
    def num_sequences(self) -> int:
        return int(self._lengths.size)

    def recorded_tokens(self, request_ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """int64 ``[tokens]``: the trace token each ``(request_ids[i], positions[i])`` replays."""
        requests = np.asarray(request_ids, dtype=np.int64)
        pos = np.asarray(positions, dtype=np.int64)
        if requests.ndim != 1 or requests.shape != pos.shape:
            raise ValueError(
                f"request_ids and positions must be 1-D of one length, got shapes {requests.shape} and {pos.shape}"
            )
        sequence = self._permutation[np.mod(requests, self.num_sequences)]
        length = self._lengths[sequence]
        offset = (combine(self._offset_key, requests) % length.astype(np.uint64)).astype(np.int64)
        return self._tokens[sequence, np.mod(offset + pos, length)]

    def logits(self, request_ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Float32 ``[num_moe_layers, tokens, num_experts]`` for tokens ``(request_ids[i], positions[i])``; a new
        array the caller may modify."""
        return self._logits[:, self.recorded_tokens(request_ids, positions), :]
