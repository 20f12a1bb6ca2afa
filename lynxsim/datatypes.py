"""The data that crosses the package's layers, in one place that depends on nothing of lynxsim.

What a workload hands the engine (``RequestSpec``), what a policy returns (``Selection``), what the engine hands
a cost model (``BatchShape``, ``ExpertActivity``) and what a cost model returns (``LatencyBreakdown``) are used by
layers far apart (workload, policies, routing, cost, engine, calibration, metrics). Defined in any one of those
packages, they would make every other one import it, up or across the layers (docs/architecture.md); here, at
the bottom, each package imports only the types it exchanges.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, overload

import numpy as np

DROPPED = -1
"""Expert id of a slot a policy left empty (policies that drop assignments); its weight is 0."""


class Selection(NamedTuple):
    """What a policy chose for each token.

    ``expert_ids``: int64 ``[..., tokens, top_k]``, distinct per token; ``DROPPED`` (-1) marks an empty slot.
    ``weights``: float ``[..., tokens, top_k]``, positive for used slots, 0 for dropped ones.
    """

    expert_ids: np.ndarray
    weights: np.ndarray


@dataclass(frozen=True)
class RequestSpec:
    """What arrives: when, and how many prompt tokens it brings and output tokens it will generate."""

    request_id: int
    arrival_s: float
    prompt_tokens: int
    output_tokens: int


@dataclass(frozen=True, eq=False)
class PrefixIdentity:
    """Which of a run's requests share leading tokens, for prefix caching: each request's prefix as a list of
    ``unit_tokens``-token units (``unit_ids[unit_starts[r] : unit_starts[r] + unit_counts[r]]``), of which the
    first ``keyed_tokens[r]`` tokens may be shared.

    Unit ids are prefix-chained: two requests whose ``q``-th units have the same id agree on every token up to
    that unit's end. Mooncake traces give 512-token units as ``hash_ids``; a task's few-shot prefix or a
    conversation's history is one unit as long as any request (``WHOLE``) whose id names the task or the session.
    Block granularity is the engine's (``lynxsim.engine.compiled.prefix_cache.block_identities``)."""

    unit_tokens: int
    unit_starts: np.ndarray  # int64 [requests]
    unit_counts: np.ndarray  # int64 [requests]
    unit_ids: np.ndarray  # int64: every request's units, one after the other
    keyed_tokens: np.ndarray  # int64 [requests]: leading tokens that another request may share

    WHOLE = 1 << 40
    """``unit_tokens`` of one unit per request that covers all its shared tokens."""

    def __post_init__(self) -> None:
        sizes = {np.shape(a) for a in (self.unit_starts, self.unit_counts, self.keyed_tokens)}
        if len(sizes) != 1 or self.unit_tokens < 1:
            raise ValueError(f"prefix columns of different lengths ({sorted(sizes)}) or unit_tokens < 1")

    @classmethod
    def whole(cls, group_ids: np.ndarray, keyed_tokens: np.ndarray) -> PrefixIdentity:
        """One unit per request: requests of one group share their first ``keyed_tokens`` tokens (a task's
        few-shot prefix, a session's history)."""
        count = len(group_ids)
        return cls(cls.WHOLE, np.arange(count, dtype=np.int64), np.ones(count, dtype=np.int64),
                   np.asarray(group_ids, dtype=np.int64), np.asarray(keyed_tokens, dtype=np.int64))

    def take(self, rows: np.ndarray | slice) -> PrefixIdentity:
        """The requests at ``rows``, in that order."""
        return PrefixIdentity(self.unit_tokens, self.unit_starts[rows], self.unit_counts[rows], self.unit_ids,
                              self.keyed_tokens[rows])

    def __len__(self) -> int:
        return int(self.keyed_tokens.size)


class RequestTable(Sequence[RequestSpec]):
    """A run's requests as columns, one value per request: a sequence of ``RequestSpec`` made on access. A run
    holds millions of requests: a million took 2.8 s to draw as a list of ``RequestSpec`` (making the objects
    alone: 1.6 s and 210 MB), 0.1 s as columns of 32 bytes a request; ten million take 1.1 s (measured). The
    engine reads the columns.

    Closed-loop requests (``ClosedLoopArrivals``) have no arrival time until a client sends them (NaN; the engine
    fills a copy in as it runs) and carry ``think_s``: the wait before each is sent, after its client's last
    request ended (None for every other workload). ``prefix``: which requests share leading tokens (prefix
    caching; None: none is known to)."""

    __slots__ = ("arrival_s", "output_tokens", "prefix", "prompt_tokens", "request_id", "think_s")

    def __init__(self, request_id: np.ndarray, arrival_s: np.ndarray, prompt_tokens: np.ndarray,
                 output_tokens: np.ndarray, think_s: np.ndarray | None = None,
                 prefix: PrefixIdentity | None = None) -> None:
        self.request_id = _int_array(request_id, "request_id")
        self.arrival_s = np.asarray(arrival_s, dtype=np.float64)
        self.prompt_tokens = _int_array(prompt_tokens, "prompt_tokens")
        self.output_tokens = _int_array(output_tokens, "output_tokens")
        self.think_s = None if think_s is None else np.asarray(think_s, dtype=np.float64)
        self.prefix = prefix
        if prefix is not None and len(prefix) != self.request_id.size:
            raise ValueError(f"prefix identity of {len(prefix)} requests for {self.request_id.size} requests")
        columns = (self.request_id, self.arrival_s, self.prompt_tokens, self.output_tokens)
        sizes = {a.shape for a in (*columns, *(() if self.think_s is None else (self.think_s,)))}
        if len(sizes) != 1:
            raise ValueError(f"request columns of different lengths: {sorted(sizes)}")

    @classmethod
    def of(cls, requests: Sequence[RequestSpec]) -> RequestTable:
        """``requests`` as a table (itself if it is one)."""
        if isinstance(requests, RequestTable):
            return requests
        return cls(np.array([r.request_id for r in requests], dtype=np.int64),
                   np.array([r.arrival_s for r in requests], dtype=np.float64),
                   np.array([r.prompt_tokens for r in requests], dtype=np.int64),
                   np.array([r.output_tokens for r in requests], dtype=np.int64))

    def __len__(self) -> int:
        return int(self.arrival_s.size)

    @overload
    def __getitem__(self, index: int) -> RequestSpec: ...

    @overload
    def __getitem__(self, index: slice) -> RequestTable: ...

    def __getitem__(self, index: int | slice) -> RequestSpec | RequestTable:
        if isinstance(index, slice):
            return RequestTable(self.request_id[index], self.arrival_s[index], self.prompt_tokens[index],
                                self.output_tokens[index], None if self.think_s is None else self.think_s[index],
                                None if self.prefix is None else self.prefix.take(index))
        return RequestSpec(int(self.request_id[index]), float(self.arrival_s[index]), int(self.prompt_tokens[index]),
                           int(self.output_tokens[index]))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]  # mutable columns

    def __repr__(self) -> str:
        return f"RequestTable({len(self)} requests)"


def _int_array(values: object, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.int64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    return array


@dataclass(frozen=True)
class BatchShape:
    """What one iteration processes: the prefill chunks and the decode rows of a mixed batch.

    ``prefill_chunk_tokens[i]`` new prompt tokens of prefilling sequence ``i`` run this iteration, after the
    ``prefill_context_tokens[i]`` tokens already in its KV cache (earlier chunks, or a cached prefix).
    ``decode_context_tokens[j]`` is the KV length decode sequence ``j`` attends to, its new token included.
    """

    prefill_chunk_tokens: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    prefill_context_tokens: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    decode_context_tokens: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def __post_init__(self) -> None:
        chunks = _int_array(self.prefill_chunk_tokens, "prefill_chunk_tokens")
        contexts = _int_array(self.prefill_context_tokens, "prefill_context_tokens")
        decode = _int_array(self.decode_context_tokens, "decode_context_tokens")
        if chunks.shape != contexts.shape:
            raise ValueError(
                f"prefill_chunk_tokens ({chunks.size}) and prefill_context_tokens ({contexts.size}) differ in length"
            )
        if chunks.size and chunks.min() < 1:
            raise ValueError("every prefill chunk holds at least one token")
        if contexts.size and contexts.min() < 0:
            raise ValueError("prefill_context_tokens must be non-negative")
        if decode.size and decode.min() < 1:
            raise ValueError("a decode row attends to at least its own token")
        object.__setattr__(self, "prefill_chunk_tokens", chunks)
        object.__setattr__(self, "prefill_context_tokens", contexts)
        object.__setattr__(self, "decode_context_tokens", decode)

    @classmethod
    def trusted(
        cls, prefill_chunk_tokens: np.ndarray, prefill_context_tokens: np.ndarray, decode_context_tokens: np.ndarray
    ) -> BatchShape:
        """A shape from one-dimensional int64 arrays that already hold the invariants ``__post_init__`` checks
        (the engine's, built from its scheduler's state), without the checks: they cost as much as pricing."""
        shape = object.__new__(cls)
        object.__setattr__(shape, "prefill_chunk_tokens", prefill_chunk_tokens)
        object.__setattr__(shape, "prefill_context_tokens", prefill_context_tokens)
        object.__setattr__(shape, "decode_context_tokens", decode_context_tokens)
        return shape

    @property
    def num_prefill_tokens(self) -> int:
        return int(self.prefill_chunk_tokens.sum())

    @property
    def num_decode_tokens(self) -> int:
        return int(self.decode_context_tokens.size)

    @property
    def num_tokens(self) -> int:
        """Rows through every GEMM of the model this iteration."""
        return self.num_prefill_tokens + self.num_decode_tokens

    @property
    def num_sequences(self) -> int:
        return int(self.prefill_chunk_tokens.size + self.decode_context_tokens.size)


@dataclass(frozen=True)
class LatencyBreakdown:
    """One iteration's latency in seconds, by where it goes (for plots and for checking the cost model)."""

    attention_s: float  # attention core: causal prefill FLOPs and the KV-cache reads of every row
    dense_s: float  # QKV/output projections, router, dense-FFN layers, shared experts, LM head
    moe_s: float  # routed experts
    communication_s: float  # GPU-to-GPU collectives; zero on one GPU
    overhead_s: float  # fixed per-iteration CPU/scheduler cost

    @property
    def total_s(self) -> float:
        return self.attention_s + self.dense_s + self.moe_s + self.communication_s + self.overhead_s

    def as_dict(self) -> dict[str, float]:
        # Spelled out: dataclasses.asdict deep-copies field by field, a tenth of an iteration's engine time.
        return {
            "attention_s": self.attention_s,
            "dense_s": self.dense_s,
            "moe_s": self.moe_s,
            "communication_s": self.communication_s,
            "overhead_s": self.overhead_s,
            "total_s": self.total_s,
        }


@dataclass(frozen=True)
class ExpertActivity:
    """What the cost of an iteration's routed experts depends on, per MoE layer: the distinct experts with at
    least one token and the token-expert assignments; under expert parallelism the same per EP rank
    (``[layers, ranks]``). A cost model builds it from tokens per expert (``CostModel.activity``); the statistical
    routing mode samples it directly, without the per-expert counts."""

    distinct: np.ndarray  # int [moe_layers]
    assignments: np.ndarray  # int [moe_layers]
    rank_distinct: np.ndarray | None = None  # int [moe_layers, ranks], expert parallelism only
    rank_assignments: np.ndarray | None = None

    @classmethod
    def of_counts(cls, expert_token_counts: np.ndarray) -> ExpertActivity:
        counts = np.asarray(expert_token_counts)
        return cls(np.add.reduce(counts > 0, axis=-1), np.add.reduce(counts, axis=-1))
