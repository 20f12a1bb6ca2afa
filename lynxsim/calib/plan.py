"""Sweep planning: which grid points calibration times, per model shape and measured unit. No torch.

Every table is named ``<model-key>/<unit>`` (``lynxsim.cost.MEASURED_UNITS`` lists the units and their axes;
the measured cost model reads them back by those names). A plan fixes each axis's sample points:

* ``moe`` (tokens x distinct_experts): tokens dense over the decode range 1..256, where the curve bends
  (tile boundaries of the fused kernel), then doubling up to 2048 (``max_num_batched_tokens``'s default), plus
  both sides of the switch from the fused kernel to the grouped GEMM (``grouped_gemm_min_tokens``).
  Distinct experts from the model's top-k (a token always activates k distinct experts, so no real routing
  activates fewer; a dropping policy that does is extrapolated) up to all experts, every value for up to 16
  experts, otherwise coarse at the bottom and every ``E / 16`` in the upper half, where decode batches live.
  A grid point whose ``tokens * top_k`` assignments cannot reach ``distinct_experts`` experts is timed at the
  smallest token count that can (``feasible_tokens``): the table stays rectangular, and such points only
  matter as interpolation anchors (memory-bound, nearly flat in tokens). The tokens are routed at random over
  the distinct experts (``random_assignment``, ``ROUTING_DRAWS`` draws rotated within the timed graph), or,
  with ``--moe-routing even``, split evenly (``even_assignment``: the committed 2026-11-28 tables). On the GPU
  the token axis also gets both sides of every change of the fused kernel's tile configuration
  (``lynxsim.calib.sweeps.moe_config_boundaries``), so no interpolation spans one.
* ``attention_decode`` (batch x context_tokens): batch 1..256 (``max_num_seqs``'s default), context 64..8192.
* ``attention_prefill`` (chunk_tokens x context_tokens): chunks 16..2048, cached context 0..8192.
* ``dense_layer``, ``dense_ffn_layer``, ``embedding`` (tokens) and ``lm_head`` (sequences): 1-D, so dense grids
  cost little (cuBLAS picks different tiles as rows grow, so the curve has steps).
* ``graph_launch``: one point (one graph).

Quantized experts: a model whose routed experts are FP8 (``expert_weight_dtype: fp8``; ``lynxsim calibrate
--expert-dtype fp8``) gets only its ``moe`` table, on the same grid, named ``<model-key>@fp8/moe``: the other
units do not touch the experts, so the bf16 tables of ``<model-key>`` serve them (``lynxsim.cost``).

Grids are named: ``default`` is what the committed profile holds; ``tiny`` is a smoke-test grid (``--dry-run``,
CPU mode and tests).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from lynxsim.cost import DIAGNOSTIC_UNITS, MEASURED_UNITS, UnitRooflines, required_units, table_name
from lynxsim.hardware import HardwareProfile, KernelTable
from lynxsim.models.spec import ModelSpec

GRIDS = ("default", "tiny")

DECODE_TOKENS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256)
LARGE_TOKENS = (320, 384, 512, 768, 1024, 1536, 2048)
MOE_TOKENS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 384, 512, 1024, 2048)
DECODE_BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 192, 256)
DECODE_CONTEXT = (64, 128, 256, 512, 1024, 2048, 4096, 8192)
PREFILL_CHUNK = (16, 64, 256, 512, 1024, 2048)
PREFILL_CONTEXT = (0, 256, 1024, 2048, 4096, 8192)

GROUPED_GEMM_TOKENS_PER_EXPERT = 256
"""The MoE unit runs the fused Triton kernel (as vLLM does at every batch size) until a batch gives each expert
this many tokens on average (``tokens * top_k / experts``), and torch's grouped GEMM (CUTLASS) from there on.
On the H200 (benchmarks/moe_bandwidth.py, 2026-11-28) the fused kernel is as fast or faster than the grouped
GEMM at every decode batch up to 256 for Mixtral-8x7B, Qwen3-30B-A3B and OLMoE-1B-7B, so only prefill-sized
batches of Mixtral-8x7B (1024 tokens and more) take the grouped GEMM. The choice depends on the token count
alone, as a server's would (it knows the batch, not the routing, before the kernels run); calibration and
validation make the same choice (``lynxsim.calib.units.moe``)."""


def grouped_gemm_min_tokens(num_experts: int, top_k: int) -> int:
    """Smallest token count at which the MoE unit switches to the grouped GEMM."""
    return math.ceil(GROUPED_GEMM_TOKENS_PER_EXPERT * num_experts / top_k)


def moe_token_grid(num_experts: int, top_k: int) -> tuple[int, ...]:
    """``MOE_TOKENS`` plus both sides of the fused/grouped switch, so no interpolation spans it."""
    switch = grouped_gemm_min_tokens(num_experts, top_k)
    extra = {switch - 1, switch} if 1 < switch <= MOE_TOKENS[-1] else set()
    return tuple(sorted(set(MOE_TOKENS) | extra))

UNIT_DESCRIPTIONS = {
    "moe": "routed experts of one MoE layer: fused MoE kernel (align, gate/up, down with routing-weight combine; "
           "grouped GEMM from grouped_gemm_min_tokens), bf16, tokens routed over the distinct experts",
    "attention_decode": "attention core of one layer for `batch` decode rows, each over `context_tokens` KV entries",
    "attention_prefill": "attention core of one layer for one causal prefill chunk after `context_tokens` cached ones",
    "dense_layer": "rest of one MoE layer: 2 RMSNorms, QKV GEMM, rotary, KV-cache write, output GEMM, router + top-k, "
                   "shared experts, residual adds",
    "dense_ffn_layer": "rest of one dense layer: 2 RMSNorms, QKV GEMM, rotary, KV-cache write, output GEMM, dense "
                       "SwiGLU FFN, residual adds",
    "embedding": "input embedding lookup, once per iteration",
    "lm_head": "final RMSNorm, LM-head GEMM and greedy sampling over one row per sequence, once per iteration",
    "graph_launch": "replay of a CUDA graph holding one tiny kernel: the fixed GPU cost of launching an iteration",
    "dense_layer_gemms": "diagnostic, never priced: the GEMMs of dense_layer alone (attention projections, router, "
                         "shared experts), timed the same way, for docs/kernel_efficiency.md",
}

KERNEL_EXPERT_DTYPES = ("bf16", "fp8")
"""Routed-expert weight dtypes the calibration kernels run (``moe_fused``, ``moe_fused_fp8``): what ``--expert-dtype``
offers; a model whose experts are in another dtype (gpt-oss-120b's MXFP4: no kernel here, README "Quantized
experts") is refused rather than timed in a dtype it does not have."""

FP8_MOE_DESCRIPTION = (
    "routed experts of one MoE layer: fused FP8 MoE kernel at every token count (W8A8 e4m3: per-channel weight "
    "scales, the token rows and the intermediate rows quantized per row on the fly; align, gate/up, down with "
    "routing-weight combine), fp8 experts, bf16 activations in and out, tokens routed over the distinct experts"
)


def unit_description(unit: str, model: ModelSpec) -> str:
    """What a unit's table times, for ``model`` (its ``moe`` table says FP8 where the experts are)."""
    if unit == "moe" and (model.expert_weight_dtype or model.weight_dtype) == "fp8":
        return FP8_MOE_DESCRIPTION
    return UNIT_DESCRIPTIONS[unit]


@dataclass(frozen=True)
class TablePlan:
    """One table to measure: its name, unit, axes and the sample points of each axis."""

    model_key: str
    unit: str
    axes: tuple[str, ...]
    axis_values: tuple[tuple[int, ...], ...]
    description: str

    @property
    def name(self) -> str:
        return table_name(self.model_key, self.unit)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(len(v) for v in self.axis_values)

    @property
    def num_points(self) -> int:
        return math.prod(self.shape)

    def points(self) -> Iterator[tuple[int, ...]]:
        """Grid points in row-major order (the last axis fastest), the order of ``KernelTable.latency_s``."""
        def rec(prefix: tuple[int, ...], axis: int) -> Iterator[tuple[int, ...]]:
            if axis == len(self.axis_values):
                yield prefix
                return
            for value in self.axis_values[axis]:
                yield from rec((*prefix, value), axis + 1)
        yield from rec((), 0)


def distinct_expert_grid(num_experts: int, top_k: int, grid: str = "default") -> tuple[int, ...]:
    """Sample points of the distinct-experts axis: ``top_k`` .. ``num_experts``."""
    if grid == "tiny":
        values = {top_k, (top_k + num_experts) // 2, num_experts}
        return tuple(sorted(values))
    if num_experts <= 16:
        return tuple(range(top_k, num_experts + 1))
    coarse = [v for v in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48) if v < num_experts // 2]
    step = max(1, num_experts // 16)
    fine = list(range(num_experts // 2, num_experts + 1, step))
    values = {v for v in coarse + fine if v >= top_k} | {top_k, num_experts}
    return tuple(sorted(values))


def feasible_tokens(tokens: int, distinct: int, top_k: int) -> int:
    """Tokens a timing run uses for grid point (tokens, distinct): enough that ``tokens * top_k`` assignments
    reach ``distinct`` experts."""
    return max(tokens, math.ceil(distinct / top_k))


def even_assignment(tokens: int, distinct: int, top_k: int) -> list[list[int]]:
    """Expert ids ``[tokens][top_k]`` over experts ``0 .. distinct-1``: assignment ``i = t * top_k + j`` goes to
    expert ``i mod distinct``, so each token's k experts are distinct (needs ``distinct >= top_k``) and every
    expert serves ``tokens * top_k / distinct`` tokens, give or take one. Needs ``tokens * top_k >= distinct``."""
    if distinct < top_k:
        raise ValueError(f"a token uses {top_k} distinct experts, so at least {top_k} are active, not {distinct}")
    if tokens * top_k < distinct:
        raise ValueError(f"{tokens} tokens x top-{top_k} cannot activate {distinct} experts")
    return [[(t * top_k + j) % distinct for j in range(top_k)] for t in range(tokens)]


MOE_ROUTINGS = ("random", "even")
ROUTING_DRAWS = 4
"""Random expert assignments rotated through one captured graph at each MoE grid point (``random`` routing)."""


def random_assignment(tokens: int, distinct: int, top_k: int, rng: np.random.Generator) -> np.ndarray:
    """Expert ids ``[tokens, top_k]`` over experts ``0 .. distinct-1``: each token picks ``top_k`` distinct
    experts uniformly at random, then every expert left without a token takes a slot from an expert that has
    two or more (so exactly ``distinct`` experts are active). The tokens per expert then vary as a router's do
    (binomially), which sets how many ``BLOCK_M`` tiles the fused kernel runs; an even split (``even_assignment``)
    is the best case for tiles and under-predicts real routing. Needs ``top_k <= distinct <= tokens * top_k``."""
    if distinct < top_k or tokens * top_k < distinct:
        raise ValueError(f"{tokens} tokens x top-{top_k} cannot activate exactly {distinct} experts")
    ids = np.argsort(rng.random((tokens, distinct)), axis=1)[:, :top_k]
    counts = np.bincount(ids.ravel(), minlength=distinct)
    for expert in np.flatnonzero(counts == 0):
        for flat in rng.permutation(ids.size):
            t, j = divmod(int(flat), top_k)
            if counts[ids[t, j]] >= 2 and expert not in ids[t]:
                counts[ids[t, j]] -= 1
                ids[t, j] = expert
                counts[expert] += 1
                break
    return ids.astype(np.int32)


def _axis(values: tuple[int, ...], grid: str, tiny: tuple[int, ...]) -> tuple[int, ...]:
    return tiny if grid == "tiny" else values


def plan_model(model_key: str, model: ModelSpec, grid: str = "default", *, expert_parallel: int = 1) -> list[TablePlan]:
    """Every table calibration measures for one model shape (``required_units``, ``graph_launch`` and the
    diagnostic ``dense_layer_gemms``), or with ``expert_parallel`` > 1 the ``moe`` table of one EP rank: its
    ``E / expert_parallel`` experts, from one active expert up to all of them (a rank may see any number)."""
    if grid not in GRIDS:
        raise ValueError(f"unknown grid {grid!r}; known: {', '.join(GRIDS)}")
    if expert_parallel > 1:
        local = model.num_experts // expert_parallel
        axes = (_axis(moe_token_grid(local, model.top_k), grid, (1, 8, 64)), distinct_expert_grid(local, 1, grid))
        description = (f"routed experts of one expert-parallel rank (EP{expert_parallel}: {local} of "
                       f"{model.num_experts} experts, whole): {unit_description('moe', model).split(': ', 1)[1]}")
        return [TablePlan(model_key, "moe", MEASURED_UNITS["moe"], axes, description)]
    axes_values: dict[str, tuple[tuple[int, ...], ...]] = {
        "moe": (
            _axis(moe_token_grid(model.num_experts, model.top_k), grid, (1, 8, 64)),
            distinct_expert_grid(model.num_experts, model.top_k, grid),
        ),
        "attention_decode": (_axis(DECODE_BATCH, grid, (1, 4, 16)), _axis(DECODE_CONTEXT, grid, (64, 256))),
        "attention_prefill": (_axis(PREFILL_CHUNK, grid, (16, 64)), _axis(PREFILL_CONTEXT, grid, (0, 64))),
        "dense_layer": (_axis(DECODE_TOKENS + LARGE_TOKENS, grid, (1, 8, 64)),),
        "dense_ffn_layer": (_axis(DECODE_TOKENS + LARGE_TOKENS, grid, (1, 8, 64)),),
        "embedding": (_axis((1, 16, 64, 256, 1024, 2048), grid, (1, 64)),),
        "lm_head": (_axis(DECODE_TOKENS, grid, (1, 8, 16)),),
        "graph_launch": ((1,),),
        "dense_layer_gemms": (_axis(DECODE_TOKENS + LARGE_TOKENS, grid, (1, 8, 64)),),
    }
    units = [*required_units(model), "graph_launch", *DIAGNOSTIC_UNITS]
    all_axes = {**MEASURED_UNITS, **DIAGNOSTIC_UNITS}
    return [
        TablePlan(model_key, unit, all_axes[unit], axes_values[unit], unit_description(unit, model))
        for unit in units
    ]


def plan_summary(plans: list[TablePlan]) -> str:
    """One line per table: name, grid shape and number of points."""
    lines = [
        f"{p.name}: {' x '.join(f'{a}[{len(v)}]' for a, v in zip(p.axes, p.axis_values, strict=True))} "
        f"= {p.num_points} points"
        for p in plans
    ]
    lines.append(f"total: {sum(p.num_points for p in plans)} points")
    return "\n".join(lines)


def table_from_values(plan: TablePlan, latency_s: list[float]) -> KernelTable:
    """The ``KernelTable`` of a plan with one latency per grid point (in ``plan.points()`` order)."""
    return KernelTable(
        description=plan.description,
        axes=plan.axes,
        axis_values=tuple(tuple(float(v) for v in axis) for axis in plan.axis_values),
        latency_s=tuple(float(v) for v in latency_s),
    )


def roofline_tables(plans: list[TablePlan], model: ModelSpec, hardware: HardwareProfile) -> dict[str, KernelTable]:
    """Tables filled with each unit's roofline time instead of measurements (calibration's ``--dry-run``, and
    tests): the MoE table at the token count a timing run would use (``feasible_tokens``)."""
    rooflines = UnitRooflines(model, hardware)
    tables = {}
    for plan in plans:
        function = rooflines.unit_roofline(plan.unit)
        values = []
        for point in plan.points():
            if plan.unit == "moe":
                point = (feasible_tokens(point[0], point[1], model.top_k), point[1])
            values.append(float(function(*point)))
        tables[plan.name] = table_from_values(plan, values)
    return tables
