"""An iteration's latency inside the compiled engine: the cost model's formulas evaluated by numba.

``CostModel`` (roofline) and ``MeasuredCostModel`` (kernel tables), and ``ParallelCostModel`` over either (a
shard's compute, the EP ranks' experts, the collectives), price an iteration with a few Python calls each; the
compiled engine (``lynxsim.engine.compiled.kernel``) cannot call back into Python per iteration, so this module
evaluates the same formulas on arrays taken from the cost model once per run (``Pricing.of``):

* the dense part is tabulated by token count and by sequence count (``CostModel.dense_parts_s``), and so are
  the collectives: all-reduces by token count, an all-to-all by its busiest rank's assignments
  (``ParallelCostModel.communication_parts_s``);
* attention and the routed experts are evaluated per iteration: the roofline formulas of ``CostModel`` with its
  constants (``CostModel.roofline_terms``), or, for a measured cost model, the bilinear log-space interpolation
  of ``TableInterpolator.scalar`` on the same grids (``TableInterpolator.grid``) with the same roofline scaling
  outside them. MoE values are cached per (assignments, distinct experts) as the measured model caches its rows.
  Under expert parallelism each rank is priced so (by the whole model's measured table where the parallel cost
  model has one) and a layer takes its slowest rank's time.

The operations are those of the Python cost model, in the same order where the Python code is scalar; where it
sums arrays (numpy's pairwise summation over several prefill chunks or over layers) the sums here are sequential,
so the two agree to a few units in the last place (the engine tests compare them at 1e-12). Imported only through
``lynxsim.jit.kernels``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from numba import njit

from lynxsim.cost import CostModel, MeasuredCostModel, TableInterpolator
from lynxsim.engine.compiled import supported
from lynxsim.parallel import ParallelCostModel

ROOFLINE, MEASURED = 0, 1
"""``Pricing.kind``: which formulas price attention and experts."""

# Indices into ``Pricing.terms`` (the roofline constants, CostModel.roofline_terms).
T_LAYERS, T_KV_BYTES, T_BANDWIDTH, T_DECODE_FLOPS, T_PREFILL_FLOPS, T_ATTENTION_FLOPS = 0, 1, 2, 3, 4, 5
T_ATTENTION_LAUNCH, T_EXPERT_MEMORY, T_ASSIGNMENT_COMPUTE, T_MOE_LAYER_LAUNCH, T_MOE_LAYERS_LAUNCH = 6, 7, 8, 9, 10
T_TOP_K, T_OVERHEAD = 11, 12
T_ATTENTION_UNIT_BYTES, T_ATTENTION_UNIT_FLOPS, T_DECODE_UNIT_LAUNCH, T_PREFILL_UNIT_LAUNCH = 13, 14, 15, 16
_TERM_NAMES = (
    "num_layers", "kv_bytes_per_token_layer", "bandwidth_bytes_per_s", "decode_flops_per_pair",
    "prefill_flops_per_pair", "attention_flops_per_s", "attention_launch_s", "expert_memory_s",
    "assignment_compute_s", "moe_layer_launch_s", "moe_layers_launch_s", "top_k", "overhead_s",
    "attention_unit_bytes", "attention_unit_flops_per_row", "decode_attention_unit_launch_s",
    "prefill_attention_unit_launch_s",
)

# Which unit's roofline scales a measured table outside its grid.
UNIT_ATTENTION_DECODE, UNIT_ATTENTION_PREFILL, UNIT_MOE = 0, 1, 2


class Grid(NamedTuple):
    """A two-axis measured table as numba takes it: coordinates per axis, log latencies ``[n0, n1]``, and
    ``meta`` = (log1p axis 0, log1p axis 1, lo 0, lo 1, hi 0, hi 1) as floats."""

    coords0: np.ndarray
    coords1: np.ndarray
    log_latency: np.ndarray
    meta: np.ndarray


_NO_GRID = Grid(np.zeros(1), np.zeros(1), np.zeros((1, 1)), np.zeros(6))


def _grid(interpolator: TableInterpolator) -> Grid:
    grid = interpolator.grid
    if len(grid.coords) != 2:
        raise ValueError(f"the compiled engine interpolates two-axis tables, got {len(grid.coords)} axes")
    meta = np.array([float(grid.log1p[0]), float(grid.log1p[1]), grid.lo[0], grid.lo[1], grid.hi[0], grid.hi[1]])
    return Grid(np.ascontiguousarray(grid.coords[0]), np.ascontiguousarray(grid.coords[1]),
                np.ascontiguousarray(grid.log_latency), meta)


class Pricing(NamedTuple):
    """Everything the compiled engine needs to price iterations of one cost model: the one-GPU model's (or, for
    a ``ParallelCostModel``, its shard's) attention, dense and expert formulas, the collectives tabulated, and,
    under expert parallelism, how each EP rank's experts are priced (``ranks`` > 0)."""

    kind: int
    terms: np.ndarray  # float64, indexed by the T_* constants
    dense_by_tokens_s: np.ndarray  # float64 [max_tokens + 1]
    dense_by_sequences_s: np.ndarray  # float64 [max_sequences + 1]
    attention_decode: Grid
    attention_prefill: Grid
    moe: Grid
    moe_cache_s: np.ndarray  # float64 [max assignments + 2, experts + 1], NaN where not yet computed
    allreduce_by_tokens_s: np.ndarray  # float64 [max_tokens + 1]: every all-reduce of an iteration
    ranks: int  # EP ranks; 0 without expert parallelism
    rank_kind: int  # ROOFLINE or MEASURED: how an EP rank's experts are priced
    rank_terms: np.ndarray  # the constants of the model whose units price a rank
    rank_moe: Grid
    rank_cache_s: np.ndarray  # like moe_cache_s, for ranks
    all_to_all_by_assignments_s: np.ndarray  # float64 [max assignments + 2]: one all-to-all, by the busiest rank

    @classmethod
    def of(cls, cost_model: object, *, max_tokens: int, max_sequences: int, num_experts: int) -> Pricing:
        """The arrays of ``cost_model`` for batches of at most ``max_tokens`` tokens and ``max_sequences``
        sequences. ``ValueError`` for a cost model whose formulas this module does not evaluate (``supported``
        says which; the engine then runs the simpy path)."""
        if not supported(cost_model):
            raise ValueError(f"no compiled pricing for {type(cost_model).__name__}")
        base = cost_model.base if isinstance(cost_model, ParallelCostModel) else cost_model
        assert isinstance(base, CostModel)
        named = base.roofline_terms()
        terms = np.array([named[name] for name in _TERM_NAMES], dtype=np.float64)
        by_tokens, by_sequences = base.dense_parts_s(max_tokens, max_sequences)
        max_assignments = max_tokens * int(named["top_k"]) + 1
        kind, grids = ROOFLINE, (_NO_GRID, _NO_GRID, _NO_GRID)
        if isinstance(base, MeasuredCostModel):
            kind = MEASURED
            # an expert-parallel shard's base has no moe table: its ranks' experts are priced below
            grids = tuple(_grid(base.units[unit]) if unit in base.units else _NO_GRID
                          for unit in ("attention_decode", "attention_prefill", "moe"))
        allreduce = np.zeros(max_tokens + 1)
        all_to_all = np.zeros(max_assignments + 1)
        ranks, rank_kind, rank_terms, rank_moe = 0, ROOFLINE, terms, _NO_GRID
        if isinstance(cost_model, ParallelCostModel):
            allreduce, all_to_all = cost_model.communication_parts_s(max_tokens, max_assignments)
            if cost_model.plan.expert_parallel_on:
                ranks = cost_model.plan.expert_parallel
                if cost_model.rank_moe_table is not None:  # a measured table prices each rank
                    rank_kind = MEASURED
                    rank_named = cost_model.rank_roofline_terms
                    assert rank_named is not None
                    rank_terms = np.array([rank_named[name] for name in _TERM_NAMES], dtype=np.float64)
                    rank_moe = _grid(cost_model.rank_moe_table)
        cache = np.full((max_assignments + 1, num_experts + 1), np.nan)
        rank_cache = np.full((max_assignments + 1, num_experts + 1), np.nan) if ranks else np.zeros((1, 1))
        return cls(kind, terms, by_tokens, by_sequences, *grids, cache, allreduce, ranks, rank_kind, rank_terms,
                   rank_moe, rank_cache, all_to_all)


@njit(inline="always")
def _bracket(coords: np.ndarray, log1p: bool, x: float) -> tuple[int, float]:
    """``TableInterpolator._bracket``: the grid cell of ``x`` along one axis and the position in it."""
    n = coords.size
    if n == 1:
        return 0, 0.0
    u = math.log1p(x) if log1p else math.log(x)
    i = np.searchsorted(coords, u, side="right") - 1
    i = min(max(i, 0), n - 2)
    return i, (u - coords[i]) / (coords[i + 1] - coords[i])


@njit(inline="always")
def _unit_roofline(unit: int, terms: np.ndarray, x0: float, x1: float) -> float:
    """The roofline of one measured unit (``UnitRooflines``'s formulas) at ``(x0, x1)``."""
    if unit == UNIT_ATTENTION_DECODE:
        pairs = x0 * x1
        memory = (pairs * terms[T_KV_BYTES] + terms[T_ATTENTION_UNIT_BYTES]) / terms[T_BANDWIDTH]
        compute = (pairs * terms[T_DECODE_FLOPS] + x0 * terms[T_ATTENTION_UNIT_FLOPS]) / terms[T_ATTENTION_FLOPS]
        return max(memory, compute) + terms[T_DECODE_UNIT_LAUNCH]
    if unit == UNIT_ATTENTION_PREFILL:
        rows = x0 + x1
        memory = (rows * terms[T_KV_BYTES] + terms[T_ATTENTION_UNIT_BYTES]) / terms[T_BANDWIDTH]
        pairs = x0 * (x1 + (x0 + 1.0) * 0.5)
        compute = (pairs * terms[T_PREFILL_FLOPS] + rows * terms[T_ATTENTION_UNIT_FLOPS]) / terms[T_ATTENTION_FLOPS]
        return max(memory, compute) + terms[T_PREFILL_UNIT_LAUNCH]
    memory = x1 * terms[T_EXPERT_MEMORY]
    compute = x0 * terms[T_TOP_K] * terms[T_ASSIGNMENT_COMPUTE]
    return max(memory, compute) + terms[T_MOE_LAYER_LAUNCH]


@njit(inline="always")
def interpolate(grid: Grid, unit: int, terms: np.ndarray, x0: float, x1: float) -> float:
    """``TableInterpolator._scalar_2d``: the table's latency at ``(x0, x1)``, roofline-scaled outside it."""
    coords0, coords1, values, meta = grid
    c0 = min(max(x0, meta[2]), meta[4])
    c1 = min(max(x1, meta[3]), meta[5])
    i0, w0 = _bracket(coords0, meta[0] != 0.0, c0)
    i1, w1 = _bracket(coords1, meta[1] != 0.0, c1)
    total = 0.0
    weight = (1.0 - w0) * (1.0 - w1)
    if weight:
        total += weight * values[i0, i1]
    if w1 != 0.0:
        weight = (1.0 - w0) * w1
        if weight:
            total += weight * values[i0, i1 + 1]
    if w0 != 0.0:
        weight = w0 * (1.0 - w1)
        if weight:
            total += weight * values[i0 + 1, i1]
        if w1 != 0.0:
            weight = w0 * w1
            if weight:
                total += weight * values[i0 + 1, i1 + 1]
    value = math.exp(total)
    if c0 != x0 or c1 != x1:
        denominator = _unit_roofline(unit, terms, c0, c1)
        if denominator > 0.0:
            value *= _unit_roofline(unit, terms, x0, x1) / denominator
    return value


@njit(cache=True)
def _moe_layer_s(cache: np.ndarray, grid: Grid, terms: np.ndarray, assignments: int, distinct: int) -> float:
    """One MoE layer's measured time at its assignments and distinct experts, remembered in ``cache`` (a miss:
    the caller looks there first, inline, since handing a function arrays takes a reference to each, tens of
    nanoseconds per MoE layer, more than the lookup)."""
    value = interpolate(grid, UNIT_MOE, terms, assignments / terms[T_TOP_K], float(distinct))
    if assignments < cache.shape[0]:
        cache[assignments, distinct] = value
    return value


@njit(inline="always")
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
    """``iteration_activity``: ``out`` = (attention, dense, moe, communication, overhead, total) seconds of an
    iteration with ``decode_rows`` decode rows (their context lengths summing to ``decode_context_sum``, each row
    counting the token it computes), prefill chunks ``chunks[:num_chunks]`` over cached contexts
    ``chunk_contexts``, and per MoE layer ``distinct`` experts and ``assignments`` (per EP rank:
    ``rank_distinct``/``rank_assignments`` ``[layers, ranks]``, read only under expert parallelism, where the
    layer's MoE time is its slowest rank's and each layer adds a dispatch and a combine all-to-all)."""
    terms = pricing.terms
    layers = terms[T_LAYERS]
    if pricing.kind == MEASURED:
        layer_s = 0.0
        if decode_rows:
            layer_s += interpolate(pricing.attention_decode, UNIT_ATTENTION_DECODE, terms, float(decode_rows),
                                   decode_context_sum / decode_rows)
        for c in range(num_chunks):
            layer_s += interpolate(pricing.attention_prefill, UNIT_ATTENTION_PREFILL, terms, float(chunks[c]),
                                   float(chunk_contexts[c]))
        attention = layers * layer_s
        moe = 0.0
        cache = pricing.moe_cache_s
        grid = pricing.moe
        for layer in range(distinct.size):
            a = assignments[layer]
            d = distinct[layer]
            value = cache[a, d] if a < cache.shape[0] else np.nan
            moe += _moe_layer_s(cache, grid, terms, a, d) if math.isnan(value) else value  # NaN: not cached yet
    else:
        decode_kv = float(decode_context_sum)
        prefill_kv = 0.0
        prefill_pairs = 0.0
        for c in range(num_chunks):
            chunk = float(chunks[c])
            context = float(chunk_contexts[c])
            prefill_kv += context + chunk
            prefill_pairs += chunk * (context + (chunk + 1.0) * 0.5)
        layer_bytes = terms[T_KV_BYTES] * (decode_kv + prefill_kv)
        layer_flops = terms[T_DECODE_FLOPS] * decode_kv + terms[T_PREFILL_FLOPS] * prefill_pairs
        layer_s = max(layer_bytes / terms[T_BANDWIDTH], layer_flops / terms[T_ATTENTION_FLOPS])
        attention = layers * (layer_s + terms[T_ATTENTION_LAUNCH])
        moe = 0.0
        for layer in range(distinct.size):
            moe += max(distinct[layer] * terms[T_EXPERT_MEMORY], assignments[layer] * terms[T_ASSIGNMENT_COMPUTE])
        moe += terms[T_MOE_LAYERS_LAUNCH]
    communication = pricing.allreduce_by_tokens_s[tokens]
    if pricing.ranks:
        moe = 0.0
        all_to_all = 0.0
        rank_terms = pricing.rank_terms
        rank_cache = pricing.rank_cache_s
        rank_grid = pricing.rank_moe
        for layer in range(rank_distinct.shape[0]):
            slowest = 0.0
            busiest = 0
            for rank in range(rank_distinct.shape[1]):
                a = rank_assignments[layer, rank]
                d = rank_distinct[layer, rank]
                if pricing.rank_kind == MEASURED:
                    value = rank_cache[a, d] if a < rank_cache.shape[0] else np.nan
                    if math.isnan(value):  # not cached yet
                        value = _moe_layer_s(rank_cache, rank_grid, rank_terms, a, d)
                else:
                    value = max(d * rank_terms[T_EXPERT_MEMORY], a * rank_terms[T_ASSIGNMENT_COMPUTE]) \
                        + rank_terms[T_MOE_LAYER_LAUNCH]
                slowest = max(slowest, value)
                busiest = max(busiest, a)
            moe += slowest
            all_to_all += pricing.all_to_all_by_assignments_s[busiest]
        communication += 2.0 * all_to_all
    dense = pricing.dense_by_tokens_s[tokens] + pricing.dense_by_sequences_s[sequences]
    overhead = terms[T_OVERHEAD]
    out[0] = attention
    out[1] = dense
    out[2] = moe
    out[3] = communication
    out[4] = overhead
    out[5] = attention + dense + moe + communication + overhead
