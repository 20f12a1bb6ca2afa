"""An iteration's latency: every formula of the cost models, stated once, for the Python cost models and the
compiled engine alike.

The cost models (``lynxsim.cost``: roofline and measured tables; ``lynxsim.parallel``: a TP/EP shard, the EP
ranks' experts, the collectives) hold a model's constants and tables; the compiled engine
(``lynxsim.engine.compiled``) simulates an instance in a numba loop that cannot call back into Python. Both price
an iteration with the functions below, on the same arrays (``Pricing``, built by the cost model: ``pricing``), so
the two paths cannot drift apart: the Python cost model calls ``price_batch`` (or a component) once per
iteration, the engine's loop calls ``price_iteration`` inline.

* Roofline: every kernel takes ``max(bytes / bandwidth, FLOPs / FLOP/s) + launches`` (``roofline_s``). One
  attention kernel per layer serves every row (``attention_roofline_s``); a MoE layer reads each active expert's
  weights once and computes every assignment (``experts_roofline_s``); each measured unit has its own work
  (``unit_work``) and roofline (``unit_roofline``), which scale a measured table outside its grid.
* Measured tables: bilinear interpolation in log space (``interpolated``), scaled by the unit's roofline outside
  the grid (``unit_interpolated``). A measured MoE layer's value is remembered per (assignments, distinct
  experts) in ``Pricing.experts_cache_s``.
* The dense part (every non-expert GEMM, the embedding, the LM head) and the collectives are tabulated by the
  cost model (``CostModel.dense_parts_s``, ``ParallelCostModel.communication_parts_s``), by token count, by
  sequence count and by the busiest EP rank's assignments, and looked up here.
* Expert parallelism: a layer's experts take its slowest rank's time (``routed_experts_s``) and each MoE layer
  adds a dispatch and a combine all-to-all at its busiest rank's assignments (``all_to_all_s``).

Every function is plain Python over scalars and numpy arrays, in the subset numba compiles. Where numba runs
(``lynxsim.jit``) each is compiled and cached on disk, the small per-layer ones inlined into their callers; with
``LYNXSIM_NO_NUMBA`` set or without numba they run as the Python they are, to the same numbers, slower. Importing
this module imports numba (0.4 s), so ``lynxsim.cost`` imports it on first use.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, TypeVar

import numpy as np
from numpy.typing import ArrayLike

from lynxsim.jit import compiled

F = TypeVar("F", bound=Callable[..., Any])


def _compiled(*, inline: bool = False) -> Callable[[F], F]:
    """Compile a formula where numba runs, cached on disk; ``inline`` ones (the small ones, called per layer or
    per iteration) are inlined into their compiled callers, where a call would cost more than they do."""
    return compiled(cache=True, inline="always" if inline else "never")


# ----- the constants of a model (``Pricing.terms``) ---------------------------------------------------------------

UNIT_NAMES = ("moe", "attention_decode", "attention_prefill", "dense_layer", "dense_ffn_layer", "dense_layer_gemms",
              "embedding", "lm_head", "graph_launch")
"""The units of ``lynxsim.cost.MEASURED_UNITS`` and ``DIAGNOSTIC_UNITS``, numbered as the formulas take them."""
MOE, ATTENTION_DECODE, ATTENTION_PREFILL, DENSE_LAYER, DENSE_FFN_LAYER, DENSE_LAYER_GEMMS = 0, 1, 2, 3, 4, 5
EMBEDDING, LM_HEAD, GRAPH_LAUNCH = 6, 7, 8
RANK_MOE = 9
"""``Pricing.table_at`` slot of the ``moe`` table that prices one EP rank's experts."""
WORK_UNITS = UNIT_NAMES[:GRAPH_LAUNCH]
"""The units that do work (``unit_work``); ``graph_launch`` times a launch."""

TERM_NAMES = (
    "num_layers", "bandwidth_bytes_per_s", "kernel_launch_s", "overhead_s",
    # the attention core, one kernel per layer over every row of the batch (CostModel.attention_time_s)
    "kv_bytes_per_token_layer", "decode_flops_per_pair", "prefill_flops_per_pair", "attention_flops_per_s",
    "attention_launch_s",
    # one MoE layer's routed experts
    "expert_bytes", "flops_per_assignment", "top_k",
    # the measured units' own work (UnitRooflines): MLA's kv_b inside the attention units, the GEMM units' weights
    "attention_unit_bytes", "attention_unit_flops_per_row", "dense_layer_bytes", "dense_layer_flops_per_row",
    "dense_ffn_layer_bytes", "dense_ffn_layer_flops_per_row", "embedding_row_bytes", "lm_head_bytes",
    "lm_head_flops_per_row",
    # per unit that does work: the sustained FLOP/s its FLOPs run at, and its kernels' launches
    *(f"{unit}_flops_per_s" for unit in WORK_UNITS),
    *(f"{unit}_launch_s" for unit in WORK_UNITS),
)
"""The names of ``Pricing.terms``' entries (``CostModel.roofline_terms``), in order."""
NUM_LAYERS, BANDWIDTH, KERNEL_LAUNCH, OVERHEAD = 0, 1, 2, 3
KV_BYTES, DECODE_FLOPS_PER_PAIR, PREFILL_FLOPS_PER_PAIR, ATTENTION_FLOPS_PER_S, ATTENTION_LAUNCH = 4, 5, 6, 7, 8
EXPERT_BYTES, FLOPS_PER_ASSIGNMENT, TOP_K = 9, 10, 11
ATTENTION_UNIT_BYTES, ATTENTION_UNIT_FLOPS_PER_ROW, DENSE_LAYER_BYTES, DENSE_LAYER_FLOPS_PER_ROW = 12, 13, 14, 15
DENSE_FFN_LAYER_BYTES, DENSE_FFN_LAYER_FLOPS_PER_ROW, EMBEDDING_ROW_BYTES, LM_HEAD_BYTES = 16, 17, 18, 19
LM_HEAD_FLOPS_PER_ROW = 20
UNIT_FLOPS_PER_S = 21
"""``terms[UNIT_FLOPS_PER_S + unit]``: the sustained FLOP/s of a unit that does work."""
UNIT_LAUNCH = UNIT_FLOPS_PER_S + len(WORK_UNITS)
"""``terms[UNIT_LAUNCH + unit]``: the launches of one call of a unit that does work."""


def terms_array(named: Mapping[str, float]) -> np.ndarray:
    """``Pricing.terms``' row of the constants ``named`` (``CostModel.roofline_terms``); NaN where a model has no
    such constant (the roofline ``CostModel`` has no measured units), so that a formula reading one shows it."""
    unknown = set(named) - set(TERM_NAMES)
    if unknown:
        raise ValueError(f"unknown pricing terms {sorted(unknown)}")
    return np.array([named.get(name, math.nan) for name in TERM_NAMES], dtype=np.float64)


# ----- what prices an iteration -------------------------------------------------------------------------------------

ROOFLINE, MEASURED = 0, 1
"""``Pricing.kind`` and ``Pricing.rank_kind``: priced by the roofline, or by measured tables."""
LAYER_EXPERTS, RANK_EXPERTS = 0, 1
"""Whose routed experts ``routed_experts_s`` prices: a MoE layer's on the instance's GPU (or TP shard), or an
EP rank's; also the row of ``Pricing.terms`` with their constants."""


class Pricing(NamedTuple):
    """Everything the formulas price a cost model's iterations from, for batches of up to ``capacity(pricing)``
    tokens: the (shard's) model's constants and tables, the dense part and the collectives tabulated, and, under
    expert parallelism (``ranks`` > 0), how each EP rank's experts are priced. Built by the cost model
    (``CostModel.pricing``, ``ParallelCostModel.pricing``)."""

    kind: int  # ROOFLINE or MEASURED: how attention and the routed experts are priced
    terms: np.ndarray  # float64 [2, TERM_NAMES]: row LAYER_EXPERTS the model's, row RANK_EXPERTS an EP rank's experts'
    tables: np.ndarray  # float64: the measured tables, packed one after another (``pack_table``)
    table_at: np.ndarray  # int64 [RANK_MOE + 1]: where each unit's table starts in ``tables``; -1: none
    dense_s: np.ndarray  # float64 [2, capacity + 1]: the dense part by tokens (row 0) plus by sequences (row 1)
    allreduce_s: np.ndarray  # float64 [capacity + 1]: every all-reduce of an iteration by its tokens (zeros: one GPU)
    all_to_all_s: np.ndarray  # float64 [assignment_capacity + 1]: one all-to-all by its busiest rank's assignments
    experts_cache_s: np.ndarray  # float64 [assignment_capacity + 1, experts + 1]: a measured MoE layer's (or EP
    #                              rank's) time by assignments and distinct experts, NaN: not yet known
    ranks: int  # EP ranks; 0 without expert parallelism
    rank_kind: int  # ROOFLINE or MEASURED: how an EP rank's experts are priced


def assignment_capacity(max_tokens: int, top_k: int) -> int:
    """The most token-expert assignments of one layer (or rank) a pricing for ``max_tokens`` tokens covers."""
    return max_tokens * top_k + 1


# ----- rooflines ----------------------------------------------------------------------------------------------------


@_compiled(inline=True)
def roofline_s(streamed_bytes: float, flops: float, bandwidth: float, flops_per_s: float, launch_s: float) -> float:
    """A kernel's roofline time: the larger of its memory time and its compute time, plus its launches."""
    return max(streamed_bytes / bandwidth, flops / flops_per_s) + launch_s


@_compiled(inline=True)
def attention_roofline_s(terms: np.ndarray, decode_kv: float, prefill_kv: float, prefill_pairs: float) -> float:
    """Attention over every layer, one kernel per layer serving every row (``CostModel.attention_time_s``):
    ``decode_kv`` KV entries read by the decode rows, ``prefill_kv`` by the prefill chunks, ``prefill_pairs``
    causal (query, key) pairs of the chunks."""
    layer_bytes = terms[KV_BYTES] * (decode_kv + prefill_kv)
    layer_flops = terms[DECODE_FLOPS_PER_PAIR] * decode_kv + terms[PREFILL_FLOPS_PER_PAIR] * prefill_pairs
    return terms[NUM_LAYERS] * roofline_s(layer_bytes, layer_flops, terms[BANDWIDTH], terms[ATTENTION_FLOPS_PER_S],
                                          terms[ATTENTION_LAUNCH])


@_compiled(inline=True)
def experts_work(terms: np.ndarray, assignments: float, distinct: float) -> tuple[float, float]:
    """(weight bytes, FLOPs) of one MoE layer's routed experts: each of the ``distinct`` active experts' weights
    read once, 2 FLOPs per weight for each of the ``assignments`` token-expert assignments."""
    return distinct * terms[EXPERT_BYTES], assignments * terms[FLOPS_PER_ASSIGNMENT]


@_compiled(inline=True)
def experts_roofline_s(terms: np.ndarray, assignments: float, distinct: float) -> float:
    """One MoE layer's routed experts on the roofline (a layer without tokens still launches its kernels)."""
    streamed, flops = experts_work(terms, assignments, distinct)
    return roofline_s(streamed, flops, terms[BANDWIDTH], terms[UNIT_FLOPS_PER_S + MOE], terms[UNIT_LAUNCH + MOE])


@_compiled(inline=True)
def unit_work(unit: int, terms: np.ndarray, x0: float, x1: float) -> tuple[float, float]:
    """(streamed bytes, FLOPs) of one call of a measured unit that does work at its table's axes ``(x0, x1)``
    (``x1`` 0 for a one-axis unit): what the roofline prices (``UnitRooflines``' docstring states each)."""
    if unit == MOE:  # tokens, distinct experts
        return experts_work(terms, x0 * terms[TOP_K], x1)
    if unit == ATTENTION_DECODE:  # batch, context
        pairs = x0 * x1
        return (pairs * terms[KV_BYTES] + terms[ATTENTION_UNIT_BYTES],
                pairs * terms[DECODE_FLOPS_PER_PAIR] + x0 * terms[ATTENTION_UNIT_FLOPS_PER_ROW])
    if unit == ATTENTION_PREFILL:  # chunk, context: the chunk's i-th token attends the context and tokens 1..i
        rows = x0 + x1
        causal_flops = x0 * (x1 + (x0 + 1.0) * 0.5) * terms[PREFILL_FLOPS_PER_PAIR]
        return (rows * terms[KV_BYTES] + terms[ATTENTION_UNIT_BYTES],
                causal_flops + rows * terms[ATTENTION_UNIT_FLOPS_PER_ROW])
    if unit == DENSE_LAYER or unit == DENSE_LAYER_GEMMS:  # tokens
        return terms[DENSE_LAYER_BYTES], terms[DENSE_LAYER_FLOPS_PER_ROW] * x0
    if unit == DENSE_FFN_LAYER:
        return terms[DENSE_FFN_LAYER_BYTES], terms[DENSE_FFN_LAYER_FLOPS_PER_ROW] * x0
    if unit == EMBEDDING:
        return x0 * terms[EMBEDDING_ROW_BYTES], 0.0
    return terms[LM_HEAD_BYTES], terms[LM_HEAD_FLOPS_PER_ROW] * x0  # LM_HEAD: sequences


@_compiled(inline=True)
def unit_roofline(unit: int, terms: np.ndarray, x0: float, x1: float) -> float:
    """The roofline time of one call of a measured unit at ``(x0, x1)``; for ``graph_launch``, one launch per
    graph."""
    if unit == GRAPH_LAUNCH:
        return x0 * terms[KERNEL_LAUNCH]
    streamed, flops = unit_work(unit, terms, x0, x1)
    return roofline_s(streamed, flops, terms[BANDWIDTH], terms[UNIT_FLOPS_PER_S + unit], terms[UNIT_LAUNCH + unit])


# ----- measured tables ----------------------------------------------------------------------------------------------

# A packed table (``pack_table``): this header, each axis's coordinates, then the log latencies, row-major. A
# one-axis table has a second axis of the single point 0, which its queries pass.
N0, N1, LOG1P0, LOG1P1, LO0, LO1, HI0, HI1 = range(8)
HEADER = 8

TINY_S = 1e-12
"""Latencies are floored here before their logarithm is taken."""


def pack_table(axis_values: Sequence[np.ndarray], latency_s: ArrayLike) -> np.ndarray:
    """A measured table of one or two non-negative axes, as ``interpolated`` reads it: each axis mapped to
    ``log(x)``, or ``log(1 + x)`` where its grid starts at 0 (a prefill chunk's cached context may be empty), the
    latencies to ``log(latency)``."""
    axes = [np.asarray(a, dtype=np.float64) for a in axis_values]
    if len(axes) == 1:
        axes.append(np.zeros(1))
    log1p = [bool(a[0] <= 0.0) for a in axes]
    coords = [np.log1p(a) if lp else np.log(a) for a, lp in zip(axes, log1p, strict=True)]
    values = np.log(np.maximum(np.asarray(latency_s, dtype=np.float64), TINY_S)).reshape(axes[0].size, axes[1].size)
    header = [axes[0].size, axes[1].size, *map(float, log1p), axes[0][0], axes[1][0], axes[0][-1], axes[1][-1]]
    return np.concatenate([np.array(header, dtype=np.float64), *coords, values.ravel()])


def packed_tables(tables: Mapping[int, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """``Pricing.tables`` and ``Pricing.table_at`` of packed tables by their unit (or ``RANK_MOE``) slot."""
    table_at = np.full(RANK_MOE + 1, -1, dtype=np.int64)
    parts, start = [], 0
    for slot, packed in tables.items():
        table_at[slot] = start
        parts.append(packed)
        start += packed.size
    return (np.concatenate(parts) if parts else np.zeros(0)), table_at


@_compiled(inline=True)
def _bracket(tables: np.ndarray, start: int, n: int, log1p: bool, x: float) -> tuple[int, float]:
    """The grid cell of ``x`` along one axis (``n`` coordinates from ``start``) and the position in it."""
    if n == 1:
        return 0, 0.0
    u = math.log1p(x) if log1p else math.log(x)
    coords = tables[start : start + n]
    i = int(np.searchsorted(coords, u, side="right")) - 1
    i = min(max(i, 0), n - 2)
    return i, (u - coords[i]) / (coords[i + 1] - coords[i])


@_compiled(inline=True)
def clamped(tables: np.ndarray, at: int, x0: float, x1: float) -> tuple[float, float]:
    """The point of the table at ``at`` nearest ``(x0, x1)``: each axis clamped to its grid's range."""
    return (min(max(x0, tables[at + LO0]), tables[at + HI0]), min(max(x1, tables[at + LO1]), tables[at + HI1]))


@_compiled(inline=True)
def interpolated(tables: np.ndarray, at: int, x0: float, x1: float, roofline_at_point: float,
                 roofline_at_edge: float) -> float:
    """The latency of the table at ``at`` at ``(x0, x1)``: bilinear interpolation in log space at the clamped
    point (exact at every grid point, a power law between two of them followed exactly, monotone wherever the
    table is), scaled outside the grid by the roofline's ratio ``roofline_at_point / roofline_at_edge`` (the
    roofline at the query over the one at the clamped point), so that a batch twice the largest measured costs
    what the roofline says twice the batch costs, relative to a measured point. Without a roofline (0 at the
    edge) the clamped value."""
    c0, c1 = clamped(tables, at, x0, x1)
    n0 = int(tables[at + N0])
    n1 = int(tables[at + N1])
    i0, w0 = _bracket(tables, at + HEADER, n0, tables[at + LOG1P0] != 0.0, c0)
    i1, w1 = _bracket(tables, at + HEADER + n0, n1, tables[at + LOG1P1] != 0.0, c1)
    base = at + HEADER + n0 + n1 + i0 * n1 + i1
    total = 0.0
    weight = (1.0 - w0) * (1.0 - w1)
    if weight:
        total += weight * tables[base]
    if w1 != 0.0:
        weight = (1.0 - w0) * w1
        if weight:
            total += weight * tables[base + 1]
    if w0 != 0.0:
        weight = w0 * (1.0 - w1)
        if weight:
            total += weight * tables[base + n1]
        if w1 != 0.0:
            weight = w0 * w1
            if weight:
                total += weight * tables[base + n1 + 1]
    value = math.exp(total)
    if (c0 != x0 or c1 != x1) and roofline_at_edge > 0.0:
        value *= roofline_at_point / roofline_at_edge
    return value


@_compiled()
def unit_interpolated(tables: np.ndarray, at: int, unit: int, terms: np.ndarray, x0: float, x1: float) -> float:
    """``interpolated`` of a measured unit's table, scaled outside its grid by the unit's roofline."""
    c0, c1 = clamped(tables, at, x0, x1)
    return interpolated(tables, at, x0, x1, unit_roofline(unit, terms, x0, x1), unit_roofline(unit, terms, c0, c1))


# ----- an iteration -------------------------------------------------------------------------------------------------


@_compiled(inline=True)
def capacity(pricing: Pricing) -> int:
    """The most tokens of an iteration ``pricing`` covers."""
    return pricing.dense_s.shape[1] - 1


@_compiled(inline=True)
def attention_s(pricing: Pricing, decode_rows: int, decode_context_sum: int, chunks: np.ndarray,
                chunk_contexts: np.ndarray, num_chunks: int) -> float:
    """Attention over every layer of ``decode_rows`` decode rows (their KV lengths, each row's new token
    included, summing to ``decode_context_sum``) and prefill chunks ``chunks[:num_chunks]`` after
    ``chunk_contexts`` cached tokens. Measured: per layer the decode rows as one call at their mean context,
    plus one call per chunk; roofline: one kernel per layer (``attention_roofline_s``)."""
    terms = pricing.terms[LAYER_EXPERTS]
    if pricing.kind == MEASURED:
        layer_s = 0.0
        # Units as np.int64, not the module's int constants: numba compiles a callee once per argument types, and a
        # constant is a literal type of its own (each unit compiled unit_interpolated again: ~1 s of a cold start).
        decode_unit, prefill_unit = np.int64(ATTENTION_DECODE), np.int64(ATTENTION_PREFILL)
        if decode_rows:
            layer_s += unit_interpolated(pricing.tables, pricing.table_at[ATTENTION_DECODE], decode_unit, terms,
                                         float(decode_rows), decode_context_sum / decode_rows)
        for c in range(num_chunks):
            layer_s += unit_interpolated(pricing.tables, pricing.table_at[ATTENTION_PREFILL], prefill_unit, terms,
                                         float(chunks[c]), float(chunk_contexts[c]))
        return terms[NUM_LAYERS] * layer_s
    prefill_kv = 0.0
    prefill_pairs = 0.0
    for c in range(num_chunks):
        chunk = float(chunks[c])
        context = float(chunk_contexts[c])
        prefill_kv += context + chunk
        prefill_pairs += chunk * (context + (chunk + 1.0) * 0.5)
    return attention_roofline_s(terms, float(decode_context_sum), prefill_kv, prefill_pairs)


@_compiled(inline=True)
def dense_s(pricing: Pricing, tokens: int, sequences: int) -> float:
    """Every non-expert GEMM, the embedding and the LM head, from the cost model's tables."""
    return pricing.dense_s[0, tokens] + pricing.dense_s[1, sequences]


@_compiled()
def _measured_experts_s(tables: np.ndarray, at: int, terms: np.ndarray, cache: np.ndarray, assignments: int,
                        distinct: int) -> float:
    """A measured MoE layer (or rank) not in ``cache`` yet: the ``moe`` table at (assignments / top_k tokens,
    distinct experts), remembered where the cache reaches."""
    value = unit_interpolated(tables, at, np.int64(MOE), terms, assignments / terms[TOP_K], float(distinct))
    if assignments < cache.shape[0]:
        cache[assignments, distinct] = value
    return value


@_compiled(inline=True)
def routed_experts_s(pricing: Pricing, whose: int, distinct: np.ndarray, assignments: np.ndarray) -> float:
    """The routed experts of MoE layers: per layer (row of ``distinct`` and ``assignments``, ``[layers, ranks]``)
    the slowest rank's time, each rank at its distinct experts and token-expert assignments. ``whose``:
    ``RANK_EXPERTS`` under expert parallelism; ``LAYER_EXPERTS`` for the instance's own layers, one "rank" each.
    Measured: the ``moe`` table at (assignments / top_k tokens, distinct experts), remembered per (assignments,
    distinct); else (or without a ``moe`` table) the roofline (``experts_roofline_s``).

    The per-layer work is written out in the loop rather than called: an inlined call handing over arrays costs
    tens of nanoseconds per layer, more than a remembered value."""
    terms = pricing.terms[whose]
    at = pricing.table_at[MOE if whose == LAYER_EXPERTS else RANK_MOE]
    measured = (pricing.kind if whose == LAYER_EXPERTS else pricing.rank_kind) == MEASURED and at >= 0
    cache = pricing.experts_cache_s
    tables = pricing.tables
    total = 0.0
    for layer in range(distinct.shape[0]):
        slowest = 0.0
        for rank in range(distinct.shape[1]):
            a = assignments[layer, rank]
            d = distinct[layer, rank]
            if measured:
                value = cache[a, d] if a < cache.shape[0] else math.nan
                if math.isnan(value):
                    value = _measured_experts_s(tables, at, terms, cache, a, d)
            else:
                value = experts_roofline_s(terms, float(a), float(d))
            slowest = max(slowest, value)
        total += slowest
    return total


@_compiled(inline=True)
def all_to_all_s(pricing: Pricing, rank_assignments: np.ndarray) -> float:
    """Dispatch and combine of every MoE layer under expert parallelism: two all-to-alls per layer, each priced at
    its busiest rank's assignments."""
    total = 0.0
    for layer in range(rank_assignments.shape[0]):
        busiest = 0
        for rank in range(rank_assignments.shape[1]):
            busiest = max(busiest, rank_assignments[layer, rank])
        total += pricing.all_to_all_s[busiest]
    return 2.0 * total


@_compiled(inline=True)
def allreduce_s(pricing: Pricing, tokens: int) -> float:
    """Every all-reduce of an iteration of ``tokens`` tokens (zero on one GPU)."""
    return pricing.allreduce_s[tokens]


@_compiled(inline=True)
def price_iteration(
    pricing: Pricing,
    decode_rows: int,
    decode_context_sum: int,
    chunks: np.ndarray,
    chunk_contexts: np.ndarray,
    num_chunks: int,
    tokens: int,
    sequences: int,
    distinct: np.ndarray,
    assignments: np.ndarray,
    rank_distinct: np.ndarray,
    rank_assignments: np.ndarray,
    out: np.ndarray,
) -> None:
    """``out`` = (attention, dense, moe, communication, overhead, total) seconds of an iteration of ``tokens``
    tokens over ``sequences`` sequences: ``decode_rows`` decode rows and prefill chunks (``attention_s``), per MoE
    layer ``distinct`` experts and ``assignments``, or under expert parallelism per layer and rank
    ``rank_distinct`` / ``rank_assignments`` ``[layers, ranks]`` (read only then). ``tokens`` must be within
    ``capacity(pricing)`` (``capacity_needed``)."""
    attention = attention_s(pricing, decode_rows, decode_context_sum, chunks, chunk_contexts, num_chunks)
    dense = dense_s(pricing, tokens, sequences)
    communication = allreduce_s(pricing, tokens)
    whose = LAYER_EXPERTS
    experts_distinct = distinct.reshape((distinct.size, 1))
    experts_assignments = assignments.reshape((assignments.size, 1))
    if pricing.ranks:
        whose, experts_distinct, experts_assignments = RANK_EXPERTS, rank_distinct, rank_assignments
        communication += all_to_all_s(pricing, rank_assignments)
    moe = routed_experts_s(pricing, whose, experts_distinct, experts_assignments)
    overhead = pricing.terms[LAYER_EXPERTS, OVERHEAD]
    out[0] = attention
    out[1] = dense
    out[2] = moe
    out[3] = communication
    out[4] = overhead
    out[5] = attention + dense + moe + communication + overhead


# ----- expert offloading -------------------------------------------------------------------------------------------


@_compiled(inline=True)
def expert_fetch_s(fetched: float, expert_bytes: float, host_bytes_per_s: float, latency_s: float) -> float:
    """Seconds to copy ``fetched`` experts' weights from host memory over the host link, one copy each, back to
    back on one copy engine: each its fixed latency plus its bytes over the link's sustained bandwidth."""
    return fetched * (latency_s + expert_bytes / host_bytes_per_s)


@_compiled(inline=True)
def exposed_fetch_s(pricing: Pricing, distinct: np.ndarray, assignments: np.ndarray, fetched: np.ndarray,
                    host_bytes_per_s: float, latency_s: float) -> float:
    """The part of the MoE layers' expert fetches an iteration waits for (``lynxsim.engine.offloading``'s overlap
    model): a layer's missing experts are fetched once its router has chosen them, while its resident experts
    compute, so the layer takes ``max(resident experts' time, fetch) + missing experts' time`` instead of its
    experts' time; the exposed part is ``max(0, fetch - resident experts' time)``. A layer's experts' time is
    ``routed_experts_s`` of its ``distinct``/``assignments`` (``pricing``'s own experts, one GPU); the resident
    ones' share of it is ``(distinct - fetched) / distinct``, each active expert's weights read once (the
    memory-bound decode case, where offloading matters)."""
    terms = pricing.terms[LAYER_EXPERTS]
    total = 0.0
    for layer in range(distinct.size):
        missing = fetched[layer]
        if missing == 0:
            continue
        fetch = expert_fetch_s(float(missing), terms[EXPERT_BYTES], host_bytes_per_s, latency_s)
        experts = routed_experts_s(pricing, LAYER_EXPERTS, distinct[layer : layer + 1].reshape((1, 1)),
                                   assignments[layer : layer + 1].reshape((1, 1)))
        resident = experts * (distinct[layer] - missing) / distinct[layer]
        total += max(0.0, fetch - resident)
    return total


# ----- disaggregated serving ---------------------------------------------------------------------------------------


@_compiled(inline=True)
def kv_transfer_s(tokens: int, kv_bytes_per_token: float, bandwidth_bytes_per_s: float, latency_s: float) -> float:
    """Seconds to move the KV cache of ``tokens`` tokens from a prefill to a decode instance: the latency plus the
    bytes over the bandwidth (``lynxsim.engine.deployment.KVTransfer``). The engine's loop and its orchestrator
    both compute a transfer's end with it, and must agree to the bit: the orchestrator's horizons compare them."""
    return latency_s + tokens * kv_bytes_per_token / bandwidth_bytes_per_s


# ----- entry points of the Python cost models -----------------------------------------------------------------------


@_compiled(inline=True)
def capacity_needed(pricing: Pricing, tokens: int, rank_assignments: np.ndarray) -> int:
    """0 where ``pricing`` covers an iteration of ``tokens`` tokens (and, under expert parallelism, per layer and
    rank ``rank_assignments``), else the tokens a pricing that covers it must be built for."""
    needed = tokens
    if pricing.ranks:
        busiest = rank_assignments.max()
        if busiest >= pricing.all_to_all_s.size:
            top_k = int(pricing.terms[LAYER_EXPERTS, TOP_K])
            needed = max(needed, (busiest + top_k - 1) // top_k)
    return needed if needed > capacity(pricing) else 0


@_compiled(inline=True)
def _check_activity(distinct: np.ndarray, assignments: np.ndarray, rank_distinct: np.ndarray,
                    rank_assignments: np.ndarray) -> None:
    """``ValueError`` where an activity's arrays differ in shape (the formulas index them without bounds checks)."""
    if distinct.shape != assignments.shape or rank_distinct.shape != rank_assignments.shape:
        raise ValueError("an expert activity's distinct experts and assignments differ in shape")


@_compiled()
def price_batch(pricing: Pricing, decode_contexts: np.ndarray, chunks: np.ndarray, chunk_contexts: np.ndarray,
                distinct: np.ndarray, assignments: np.ndarray, rank_distinct: np.ndarray, rank_assignments: np.ndarray,
                out: np.ndarray) -> int:
    """``price_iteration`` of a ``BatchShape``'s arrays into ``out``; returns 0, or, where the pricing does not
    cover the batch, the tokens one that does must be built for (``out`` then untouched)."""
    _check_activity(distinct, assignments, rank_distinct, rank_assignments)
    decode_rows = decode_contexts.size
    tokens = decode_rows + int(chunks.sum())
    needed = capacity_needed(pricing, tokens, rank_assignments)
    if needed:
        return needed
    price_iteration(pricing, decode_rows, int(decode_contexts.sum()), chunks, chunk_contexts, chunks.size, tokens,
                    decode_rows + chunks.size, distinct, assignments, rank_distinct, rank_assignments, out)
    return 0


@_compiled()
def routed_experts_layers_s(pricing: Pricing, whose: int, distinct: np.ndarray, assignments: np.ndarray,
                            out: np.ndarray) -> None:
    """``out[layer]``: each MoE layer's routed experts (``routed_experts_s`` of that layer alone)."""
    for layer in range(distinct.shape[0]):
        out[layer] = routed_experts_s(pricing, whose, distinct[layer : layer + 1], assignments[layer : layer + 1])


@_compiled()
def unit_rooflines(unit: int, terms: np.ndarray, x0: np.ndarray, x1: np.ndarray, out: np.ndarray) -> None:
    """``out[i]``: ``unit_roofline`` at ``(x0[i], x1[i])``."""
    for i in range(out.size):
        out[i] = unit_roofline(unit, terms, x0[i], x1[i])


@_compiled()
def unit_works(unit: int, terms: np.ndarray, x0: np.ndarray, x1: np.ndarray, out: np.ndarray) -> None:
    """``out[:, i]``: ``unit_work`` (streamed bytes, FLOPs) at ``(x0[i], x1[i])``."""
    for i in range(x0.size):
        out[0, i], out[1, i] = unit_work(unit, terms, x0[i], x1[i])


@_compiled()
def clamped_points(table: np.ndarray, x0: np.ndarray, x1: np.ndarray, out: np.ndarray) -> None:
    """``out[:, i]``: the packed ``table``'s point nearest ``(x0[i], x1[i])`` (``clamped``)."""
    for i in range(x0.size):
        out[0, i], out[1, i] = clamped(table, 0, x0[i], x1[i])


@_compiled()
def interpolated_points(table: np.ndarray, x0: np.ndarray, x1: np.ndarray, roofline_at_point: np.ndarray,
                        roofline_at_edge: np.ndarray, out: np.ndarray) -> None:
    """``out[i]``: the packed ``table``'s latency at ``(x0[i], x1[i])`` (``interpolated``)."""
    for i in range(x0.size):
        out[i] = interpolated(table, 0, x0[i], x1[i], roofline_at_point[i], roofline_at_edge[i])
