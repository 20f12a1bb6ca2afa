"""Iteration latency of one MoE model on one GPU, from the batch's shape and each layer's expert activity.

This is the roofline fallback of the cost model: every kernel takes the larger of its memory time (bytes over
sustained bandwidth) and its compute time (FLOPs over sustained FLOP/s), plus a fixed per-kernel cost. That is
the whole mechanism Lynx exploits: in decode, the routed experts' time is set by how many *distinct* experts a
layer activates (each one's weights are read once), not by how many tokens use them, while in prefill the
FLOPs dominate and the expert count hardly matters.

The formulas live in ``lynxsim.cost_formulas``, stated once for these classes and for the compiled engine
(``lynxsim.engine.compiled``), which evaluates them inside its loop. A cost model computes its constants once
(``roofline_terms``), tabulates its dense part (``dense_parts_s``) and builds the arrays the formulas read
(``pricing``); each iteration (hundreds of thousands per run) is then one call of the shared ``price_batch``,
compiled by numba where it runs. The components (``attention_time_s``, ``dense_time_s``, ``moe_activity_s``)
evaluate the same formulas one part at a time, for checks and reports.

``MeasuredCostModel`` (below) prices each per-layer unit from tables that ``lynxsim calibrate`` timed on a
real GPU, interpolated in log space, and uses the roofline only to extrapolate beyond a table's grid.
``make_cost_model`` picks it when the hardware profile has the tables of the run's catalog model, and the
roofline ``CostModel`` otherwise; ``source`` says which ("measured" or "roofline"). A catalog model whose
routed experts are quantized (``model.overrides.expert_weight_dtype: fp8``) is measured where the profile also
has their ``moe`` table, ``<model-key>@fp8/moe`` (``expert_table_key``), and priced by the roofline otherwise,
as any model without tables is.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from numpy.typing import ArrayLike

from lynxsim.datatypes import BatchShape, ExpertActivity, LatencyBreakdown
from lynxsim.errors import InputError
from lynxsim.hardware import HardwareProfile, KernelTable
from lynxsim.models.spec import BYTES_PER_WEIGHT, ModelSpec

if TYPE_CHECKING:
    from lynxsim.cost_formulas import Pricing

# Kernels whose fixed cost (``efficiency.kernel_launch_s``) is charged, per layer, counted as vLLM launches them
# for one decoder layer. Only kernels that stream weights or the KV cache are counted: that is the kind of kernel
# whose fixed cost was measured. Elementwise kernels (norms, rotary embedding, activation, top-k routing, KV-cache
# writes) move only activations; they cost about 1 us each in a CUDA-graph replay on an H200 and are left to the
# measured tables that replace this fallback.
ATTENTION_KERNELS_PER_LAYER = 1  # one attention kernel serves the prefill chunks and decode rows together
MOE_KERNELS_PER_LAYER = 2  # fused MoE: one grouped GEMM for gate+up, one for down, over all active experts
FFN_KERNELS = 2  # a dense FFN or the shared experts: gate+up GEMM, down GEMM
GQA_PROJECTION_KERNELS = 2  # fused QKV GEMM, output GEMM
ROUTER_KERNELS = 1
LM_HEAD_KERNELS = 1


_NO_TOKENS = np.zeros(0, dtype=np.int64)
_NO_RANK_ACTIVITY = np.zeros((1, 1), dtype=np.int64)  # the per-rank arrays the formulas skip without expert parallelism
MIN_PRICING_TOKENS = 512
"""The fewest tokens a Python cost model's pricing arrays are first built for (they grow with the batches)."""


def _formulas() -> ModuleType:
    """``lynxsim.cost_formulas``, imported on first use: it imports numba, which a process that imports this module
    without pricing an iteration (the CLI's listings) need not pay for."""
    from lynxsim import cost_formulas

    return cost_formulas


def _int64(values: np.ndarray) -> np.ndarray:
    """An activity array as the formulas take it (numba compiles a variant for each dtype it meets)."""
    return np.asarray(values, dtype=np.int64)


def _points(axes: Sequence[ArrayLike]) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """Points of a one- or two-axis table or unit as the shared formulas take them: the axes broadcast together,
    flattened into fresh float64 arrays (the second zero for one axis), and their shape."""
    arrays = np.broadcast_arrays(*(np.asarray(a, dtype=np.float64) for a in axes))
    shape = arrays[0].shape
    x0 = np.array(arrays[0], dtype=np.float64).reshape(-1)
    x1 = np.array(arrays[1], dtype=np.float64).reshape(-1) if len(arrays) > 1 else np.zeros(x0.size)
    return x0, x1, shape


@dataclass(frozen=True)
class _GemmGroup:
    """One dense weight matrix group that every layer of a kind runs: its bytes, FLOPs per row, how many
    times per iteration it runs (layers), and whether its rows are tokens or sampled sequences."""

    weight_bytes: float
    flops_per_row: float
    repeats: int
    kernels: int
    rows_are_sequences: bool


class PricedCostModel(ABC):
    """A cost model whose iterations the shared formulas (``lynxsim.cost_formulas``) price, on the arrays its
    ``pricing`` builds: the Python side of the one implementation that the compiled engine runs too. The arrays
    are built on first use and rebuilt, twice as large, when a batch outgrows them (the dense part and the
    collectives are tabulated by token count); the formulas remember measured MoE values in them."""

    _priced: Pricing | None = None

    @abstractmethod
    def pricing(self, max_tokens: int) -> Pricing:
        """The arrays the formulas price this model's iterations of up to ``max_tokens`` tokens from, with empty
        caches (the compiled engine builds its own for a run)."""

    @abstractmethod
    def activity(self, expert_token_counts: np.ndarray) -> ExpertActivity:
        """What pricing needs of ``expert_token_counts [layers, experts]``."""

    def _pricing_for(self, tokens: int, rank_assignments: np.ndarray = _NO_RANK_ACTIVITY) -> Pricing:
        """The model's pricing arrays, rebuilt where they do not cover an iteration of ``tokens`` tokens (and per
        EP rank ``rank_assignments``)."""
        formulas = _formulas()
        priced = self._priced
        if priced is None:
            priced = self._priced = self.pricing(max(tokens, MIN_PRICING_TOKENS))
        needed = formulas.capacity_needed(priced, tokens, rank_assignments)
        if needed:
            priced = self._priced = self.pricing(max(needed, 2 * formulas.capacity(priced)))
        return priced

    def iteration(self, batch: BatchShape, expert_token_counts: np.ndarray) -> LatencyBreakdown:
        """Latency of one iteration that runs ``batch`` with ``expert_token_counts[layer, expert]`` tokens
        assigned to each routed expert of each MoE layer (rows may sum to less than tokens * top_k where a
        policy dropped assignments)."""
        return self.iteration_activity(batch, self.activity(expert_token_counts))

    def iteration_activity(self, batch: BatchShape, activity: ExpertActivity) -> LatencyBreakdown:
        """Latency of one iteration from its per-layer expert activity (what ``iteration`` computes from
        tokens per expert, and what the statistical routing mode samples)."""
        decode, chunks = batch.decode_context_tokens, batch.prefill_chunk_tokens
        if not (decode.size or chunks.size):
            raise ValueError("an iteration with no tokens has nothing to cost")
        priced = self._priced if self._priced is not None else self._pricing_for(0)
        rank_distinct = rank_assignments = _NO_RANK_ACTIVITY
        if priced.ranks:  # read under expert parallelism only (else placeholders)
            if activity.rank_distinct is None or activity.rank_assignments is None:
                raise ValueError("expert parallelism prices each rank: the activity needs its per-rank arrays")
            rank_distinct = np.ascontiguousarray(activity.rank_distinct, dtype=np.int64)
            rank_assignments = np.ascontiguousarray(activity.rank_assignments, dtype=np.int64)
        arrays = (decode, chunks, batch.prefill_context_tokens, _int64(activity.distinct),
                  _int64(activity.assignments), rank_distinct, rank_assignments)
        out = np.empty(6)
        price = _formulas().price_batch
        needed = price(priced, *arrays, out)
        if needed:
            price(self._pricing_for(needed), *arrays, out)
        return LatencyBreakdown(*out.tolist()[:5])


class CostModel(PricedCostModel):
    """Roofline iteration latency of ``model`` on one ``hardware`` GPU.

    Every kernel's time is ``max(bytes / sustained_bandwidth, flops / sustained_flops) + kernels * launch``,
    with the sustained figures and the launch cost from ``hardware.efficiency``.
    """

    source = "roofline"
    needs_expert_counts = False
    """Whether pricing needs each expert's tokens (``activity``), or only each layer's distinct experts and
    assignments, which a top-k iteration whose union of experts fills early has without routing every token."""

    def __init__(self, model: ModelSpec, hardware: HardwareProfile) -> None:
        self.model = model
        self.hardware = hardware
        eff = hardware.efficiency
        self._bandwidth = hardware.sustained_bandwidth_bytes_per_s
        self._launch_s = eff.kernel_launch_s
        attn = model.attention

        # Routed experts: weights of one expert, FLOPs of one token-expert assignment (2 per weight).
        self._num_moe_layers = model.num_moe_layers
        self._num_experts = model.num_experts
        self._expert_flops_rate = hardware.sustained_flops_per_s(model.expert_weight_dtype or model.weight_dtype)

        # Attention core. Per (query, key) pair and head: 2 FLOPs per element of the q.k dot product and of the
        # p.v product. MLA decode runs weight-absorbed (as vLLM and FlashMLA do): every head attends over the
        # cached latent, q.k over kv_lora_rank + rope dims and p.v over kv_lora_rank; MLA prefill runs
        # unabsorbed with the per-head qk_head_dim and v_dim.
        self._num_layers = model.num_layers
        self._kv_bytes_per_token_layer = attn.kv_elements_per_token * BYTES_PER_WEIGHT[model.kv_cache_dtype]
        self._prefill_flops_per_pair = 2.0 * attn.num_heads * (attn.qk_head_dim + attn.v_dim)
        if attn.is_mla:
            assert attn.kv_lora_rank and attn.qk_rope_head_dim
            absorbed = (attn.kv_lora_rank + attn.qk_rope_head_dim) + attn.kv_lora_rank
            self._decode_flops_per_pair = 2.0 * attn.num_heads * absorbed
        else:
            self._decode_flops_per_pair = self._prefill_flops_per_pair
        self._attention_flops_rate = hardware.sustained_flops_per_s("bf16")
        self._attention_launch_s = ATTENTION_KERNELS_PER_LAYER * self._launch_s

        # Dense GEMMs, in the model's weight dtype.
        self._dense_flops_rate = hardware.sustained_flops_per_s(model.weight_dtype)
        self._dense_groups = self._dense_gemm_groups(model)
        self._dense_launch_s = sum(g.repeats * g.kernels for g in self._dense_groups) * self._launch_s

        self.cpu_overhead_s = eff.iteration_overhead_s  # the CPU side of the overhead (an instance's, over GPUs)
        self._overhead_s = eff.iteration_overhead_s

    @staticmethod
    def _dense_gemm_groups(model: ModelSpec) -> tuple[_GemmGroup, ...]:
        """The model's non-expert weight matrices, grouped by how often they run per iteration."""
        attn = model.attention
        wbytes = model.weight_bytes_per_param
        if attn.is_mla:  # q (one GEMM, or q_a and q_b), kv_a, kv_b, output
            projection_kernels = (2 if attn.q_lora_rank else 1) + 3
        else:
            projection_kernels = GQA_PROJECTION_KERNELS
        groups = [
            _GemmGroup(model.attention_params * wbytes, 2.0 * model.attention_params, model.num_layers,
                       projection_kernels, rows_are_sequences=False),
            _GemmGroup(model.router_params * wbytes, 2.0 * model.router_params, model.num_moe_layers,
                       ROUTER_KERNELS, rows_are_sequences=False),
        ]
        if model.num_shared_experts:
            groups.append(_GemmGroup(model.shared_experts_params * wbytes, 2.0 * model.shared_experts_params,
                                     model.num_moe_layers, FFN_KERNELS, rows_are_sequences=False))
        if model.num_dense_layers:
            groups.append(_GemmGroup(model.dense_ffn_params * wbytes, 2.0 * model.dense_ffn_params,
                                     model.num_dense_layers, FFN_KERNELS, rows_are_sequences=False))
        lm_head_params = model.vocab_size * model.hidden_size
        groups.append(_GemmGroup(lm_head_params * wbytes, 2.0 * lm_head_params, 1, LM_HEAD_KERNELS,
                                 rows_are_sequences=True))
        return tuple(groups)

    # ----- components -----

    def attention_time_s(self, batch: BatchShape) -> float:
        """Attention core over all layers.

        Per layer, one kernel serves every row of the batch:
          bytes = kv_bytes_per_token * (sum(decode_context) + sum(prefill_context + chunk))
                  (each attended KV entry read once; Q, O and the new entries' writes are small beside it)
          FLOPs = decode_flops_per_pair * sum(decode_context)
                  + prefill_flops_per_pair * sum(chunk * (context + (chunk + 1) / 2))
                  (the chunk's i-th token attends to the context and to chunk tokens 1..i: causal)
          time  = max(bytes / bandwidth, FLOPs / (flops_fraction * bf16 peak)) + launch
        (``cost_formulas.attention_roofline_s``; a measured model prices it from its tables, ``attention_s``).
        """
        decode, chunks = batch.decode_context_tokens, batch.prefill_chunk_tokens
        return float(_formulas().attention_s(self._pricing_for(0), decode.size, int(decode.sum()), chunks,
                                             batch.prefill_context_tokens, chunks.size))

    def dense_time_s(self, batch: BatchShape) -> float:
        """Every non-expert GEMM: attention projections and router on every token of every layer, shared
        experts and dense-FFN layers likewise, the LM head once per sequence (one sampled position each).

        Per GEMM: time = max(weight_bytes / bandwidth, 2 * rows * params / (flops_fraction * peak)) + launch,
        activations' bytes left out (they are small beside the weights at serving batch sizes). Looked up in the
        tables of ``dense_parts_s``.
        """
        tokens = batch.num_tokens
        return float(_formulas().dense_s(self._pricing_for(tokens), tokens, batch.num_sequences))

    def moe_time_s(self, expert_token_counts: np.ndarray) -> float:
        """Routed experts over all MoE layers, from tokens per expert per layer (see ``moe_activity_s``)."""
        return self.moe_activity_s(self.activity(expert_token_counts))

    def activity(self, expert_token_counts: np.ndarray) -> ExpertActivity:
        """Distinct experts and assignments per MoE layer of ``expert_token_counts [layers, experts]``."""
        counts = np.asarray(expert_token_counts)
        if counts.shape != (self._num_moe_layers, self._num_experts):
            raise ValueError(
                f"expert_token_counts has shape {counts.shape}, expected "
                f"(num_moe_layers, num_experts) = ({self._num_moe_layers}, {self._num_experts})"
            )
        return ExpertActivity.of_counts(counts)

    def moe_activity_s(self, activity: ExpertActivity) -> float:
        """Routed experts over all MoE layers.

        Per layer: bytes = (experts with a token) * expert_bytes (each active expert's weights read once),
        FLOPs = 2 * expert_params * (token-expert assignments), time = max(bytes / bandwidth,
        FLOPs / (flops_fraction * peak in the expert dtype)) + launch. A layer with no tokens still launches
        its kernels and costs only that (``cost_formulas.experts_roofline_s``; a measured model looks each layer
        up in its ``moe`` table, ``routed_experts_s``).
        """
        formulas = _formulas()
        return float(formulas.routed_experts_s(self._pricing_for(0), formulas.LAYER_EXPERTS,
                                               _int64(activity.distinct).reshape(-1, 1),
                                               _int64(activity.assignments).reshape(-1, 1)))

    def dense_parts_s(self, max_tokens: int, max_sequences: int) -> tuple[np.ndarray, np.ndarray]:
        """The dense part of an iteration, split into what depends on its tokens and what on its sequences and
        tabulated by count: ``dense_time_s(batch) == by_tokens[batch.num_tokens] + by_sequences[batch.num_sequences]``,
        which the formulas look up (``cost_formulas.dense_s``) instead of recomputing it each iteration."""
        tokens = np.arange(max_tokens + 1, dtype=np.float64)
        sequences = np.arange(max_sequences + 1, dtype=np.float64)
        by_tokens = np.full(tokens.shape, self._dense_launch_s)
        by_sequences = np.zeros(sequences.shape)
        for g in self._dense_groups:
            rows = sequences if g.rows_are_sequences else tokens
            per_row_s = g.flops_per_row * rows / self._dense_flops_rate
            part = g.repeats * np.maximum(g.weight_bytes / self._bandwidth, per_row_s)
            if g.rows_are_sequences:
                by_sequences += part
            else:
                by_tokens += part
        return by_tokens, by_sequences

    def roofline_terms(self) -> dict[str, float]:
        """The per-model constants the formulas read (``cost_formulas.TERM_NAMES``), by name: those of the
        attention and routed-expert rooflines, and the iteration's fixed overhead."""
        return {
            "num_layers": float(self._num_layers),
            "bandwidth_bytes_per_s": self._bandwidth,
            "kernel_launch_s": self._launch_s,
            "overhead_s": self._overhead_s,
            "kv_bytes_per_token_layer": self._kv_bytes_per_token_layer,
            "decode_flops_per_pair": self._decode_flops_per_pair,
            "prefill_flops_per_pair": self._prefill_flops_per_pair,
            "attention_flops_per_s": self._attention_flops_rate,
            "attention_launch_s": self._attention_launch_s,
            "expert_bytes": float(self.model.expert_bytes),
            "flops_per_assignment": 2.0 * self.model.expert_params,
            "top_k": float(self.model.top_k),
            "moe_flops_per_s": self._expert_flops_rate,
            "moe_launch_s": MOE_KERNELS_PER_LAYER * self._launch_s,
        }

    def pricing(self, max_tokens: int) -> Pricing:
        """The arrays the formulas price this model's iterations of up to ``max_tokens`` tokens from: its
        constants (``roofline_terms``) and its dense part tabulated (``dense_parts_s``); one GPU exchanges
        nothing."""
        formulas = _formulas()
        terms = formulas.terms_array(self.roofline_terms())
        tables, table_at = formulas.packed_tables({})
        by_tokens, by_sequences = self.dense_parts_s(max_tokens, max_tokens)
        return formulas.Pricing(
            kind=formulas.ROOFLINE, terms=np.stack([terms, terms]), tables=tables, table_at=table_at,
            dense_s=np.stack([by_tokens, by_sequences]), allreduce_s=np.zeros(max_tokens + 1),
            all_to_all_s=np.zeros(formulas.assignment_capacity(max_tokens, self.model.top_k) + 1),
            experts_cache_s=np.full((1, 1), np.nan), ranks=0, rank_kind=formulas.ROOFLINE,
        )

    # ----- the iteration -----

    def gpu_time_s(self, latency: LatencyBreakdown) -> float:
        """The part of a predicted iteration that runs on the GPU: everything but the profile's CPU-side
        ``iteration_overhead_s``, which no kernel measures (what validation compares with real execution)."""
        return latency.total_s - self.hardware.efficiency.iteration_overhead_s

    # ----- memory -----

    @property
    def weight_bytes_per_gpu(self) -> float:
        """Weight bytes resident on each GPU: all of them, as the model runs on one GPU."""
        return self.model.weight_bytes

    @property
    def kv_bytes_per_token_per_gpu(self) -> float:
        """KV-cache bytes of one token on the GPU: the model's, all of them on one GPU."""
        return self.model.kv_bytes_per_token

    def kv_cache_capacity_bytes(self, gpu_memory_utilization: float, activation_reserve_bytes: float,
                                host_expert_bytes: float = 0.0) -> int:
        """Bytes left for the KV cache: memory_bytes * utilization - weights - activation reserve (as vLLM
        sizes its cache from ``gpu_memory_utilization``), the weights less ``host_expert_bytes`` that expert
        offloading keeps in host memory (``lynxsim.engine.offloading.host_expert_bytes``). Raises ``InputError``
        when the weights do not fit."""
        if not 0.0 < gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        if activation_reserve_bytes < 0:
            raise ValueError(f"activation_reserve_bytes must be non-negative, got {activation_reserve_bytes}")
        usable = self.hardware.memory_bytes * gpu_memory_utilization
        weights = self.weight_bytes_per_gpu - host_expert_bytes
        capacity = usable - weights - activation_reserve_bytes
        if capacity <= 0:
            offloaded = f" ({host_expert_bytes / 1e9:.1f} GB of experts offloaded)" if host_expert_bytes else ""
            raise InputError(
                memory_key(usable, activation_reserve_bytes),
                f"{self.model.name} weights {weights / 1e9:.1f} GB{offloaded} plus a "
                f"{activation_reserve_bytes / 1e9:.1f} GB activation reserve do not fit in {usable / 1e9:.1f} GB "
                f"({gpu_memory_utilization:.0%} of {self.hardware.name}'s {self.hardware.memory_bytes / 1e9:.1f} GB)"
                ", leaving nothing for the KV cache",
            )
        return int(capacity)


# ===== measured cost model =========================================================================================
#
# ``lynxsim calibrate`` times the per-layer units that a decoder iteration is made of, on a real GPU, and writes
# one table per unit and model into the hardware profile, named ``<model-key>/<unit>``:
#
# - `moe` (tokens, distinct_experts): the routed experts of one MoE layer: the fused MoE kernel over `tokens`
#   tokens whose top-k choices activate `distinct_experts` experts;
# - `attention_decode` (batch, context_tokens): one layer's attention core for `batch` decode rows that each attend
#   to `context_tokens` KV entries;
# - `attention_prefill` (chunk_tokens, context_tokens): one layer's attention core for one prefill chunk of
#   `chunk_tokens` new tokens after `context_tokens` cached ones;
# - `dense_layer` (tokens): everything else of one MoE layer: norms, QKV projection, rotary embedding, KV-cache
#   write, output projection, router and top-k, shared experts, residual adds;
# - `dense_ffn_layer` (tokens): the same for a dense layer (a dense FFN instead of router and experts); only models
#   with dense layers;
# - `embedding` (tokens): the input embedding lookup, once per iteration;
# - `lm_head` (sequences): final norm, LM head GEMM and greedy sampling over one row per sequence, once per
#   iteration;
# - `graph_launch` (graphs): optional: the fixed GPU cost of launching one iteration's CUDA graph;
# - `dense_layer_gemms` (tokens): diagnostic, never priced (``DIAGNOSTIC_UNITS``): the GEMMs of `dense_layer`
#   alone, timed the same way, the floor its fused ops are compared with (docs/kernel_efficiency.md).
#
# An iteration is predicted as the sum of its units: every layer's attention (the decode rows as one call at
# their mean context, plus one call per prefill chunk), every layer's dense part, every MoE layer's experts at
# THAT layer's distinct expert count, the embedding and the LM head, plus the graph launch and the profile's
# CPU-side ``iteration_overhead_s``.

MEASURED_UNITS: dict[str, tuple[str, ...]] = {
    "moe": ("tokens", "distinct_experts"),
    "attention_decode": ("batch", "context_tokens"),
    "attention_prefill": ("chunk_tokens", "context_tokens"),
    "dense_layer": ("tokens",),
    "dense_ffn_layer": ("tokens",),
    "embedding": ("tokens",),
    "lm_head": ("sequences",),
    "graph_launch": ("graphs",),
}
"""Each measured unit and the axes of its table, in order."""

OPTIONAL_UNITS = frozenset({"graph_launch"})

DIAGNOSTIC_UNITS: dict[str, tuple[str, ...]] = {"dense_layer_gemms": ("tokens",)}
"""Units calibration times only to judge the kernels (``lynxsim.calib.efficiency``), with the axes of their
tables. They are not in ``MEASURED_UNITS``: no cost model prices them, and ``MeasuredCostModel`` reads none."""

# ModelSpec fields that do not change what a kernel computes: a model that differs from the calibrated catalog
# shape only in these still uses the catalog key's tables.
COST_NEUTRAL_FIELDS = frozenset(
    {"name", "source", "lynx_alpha", "lynx_beta", "published_total_params", "published_total_params_source",
     "renormalize"}
)


def table_name(model_key: str, unit: str) -> str:
    """Name of a measured (or diagnostic) table in a hardware profile: ``<model-key>/<unit>``."""
    if unit not in MEASURED_UNITS and unit not in DIAGNOSTIC_UNITS:
        known = ", ".join([*MEASURED_UNITS, *DIAGNOSTIC_UNITS])
        raise ValueError(f"unknown measured unit {unit!r}; known: {known}")
    return f"{model_key}/{unit}"


def required_units(model: ModelSpec) -> tuple[str, ...]:
    """The units a model's measured cost model needs (``dense_ffn_layer`` only where it has dense layers)."""
    return tuple(
        unit for unit in MEASURED_UNITS
        if unit not in OPTIONAL_UNITS and (unit != "dense_ffn_layer" or model.num_dense_layers)
    )


class TableInterpolator:
    """Latency at any point of a measured table of one or two axes: bilinear interpolation in log space,
    roofline-scaled outside the grid (``lynxsim.cost_formulas.interpolated``, the function the cost models price
    iterations with).

    * Coordinates: each axis is mapped to ``log(x)``, or to ``log(1 + x)`` when its grid starts at 0 (a prefill
      chunk's cached context may be empty). Values: ``log(latency)``. Between grid points the interpolation is
      bilinear in those coordinates, so a latency that grows as a power of an axis between two grid points
      (constant, linear, quadratic) is followed closely, it is exact at every grid point, and it is monotone
      along an axis wherever the table is (a weighted mean of monotone neighbours, under monotone maps).
    * Outside the grid, the query is clamped to the grid's range on each axis, and the clamped point's latency
      is scaled by the unit's roofline ``roofline(query) / roofline(clamped)`` (memory and compute terms plus the
      launch cost), so that a batch twice the largest measured one costs what the roofline says twice the
      batch costs, relative to a measured point. Without a roofline the clamped value is returned.
    """

    def __init__(self, table: KernelTable, roofline: Callable[..., np.ndarray] | None = None) -> None:
        self.table = table
        self.roofline = roofline
        self.axes = tuple(np.asarray(values, dtype=np.float64) for values in table.axis_values)
        if len(self.axes) not in (1, 2):
            raise ValueError(f"measured table axes {table.axes}: tables of one or two axes are interpolated")
        if any(a[0] < 0.0 for a in self.axes):
            raise ValueError(f"measured table axes {table.axes} must be non-negative")
        self.packed = _formulas().pack_table(self.axes, table.latency_s)
        """The table as the formulas read it (``cost_formulas.pack_table``)."""

    @property
    def ndim(self) -> int:
        return len(self.axes)

    def scalar(self, *point: float) -> float:
        """Latency (s) at one point."""
        if len(point) != self.ndim:
            raise ValueError(f"table has axes {self.table.axes}, got {len(point)} coordinates")
        return float(self(*point))

    def __call__(self, *points: ArrayLike) -> np.ndarray:
        """Latency (s) at many points at once: one array per axis, broadcast together."""
        if len(points) != self.ndim:
            raise ValueError(f"table has axes {self.table.axes}, got {len(points)} coordinate arrays")
        formulas = _formulas()
        x0, x1, shape = _points(points)
        edge = np.empty((2, x0.size))
        formulas.clamped_points(self.packed, x0, x1, edge)
        at_point = at_edge = np.zeros(x0.size)
        if self.roofline is not None:
            at_point = np.array(np.broadcast_to(self.roofline(*points), shape), dtype=np.float64).reshape(-1)
            at_edge = np.array(np.broadcast_to(self.roofline(*edge[: self.ndim]), x0.shape), dtype=np.float64)
        out = np.empty(x0.size)
        formulas.interpolated_points(self.packed, x0, x1, at_point, at_edge, out)
        return out.reshape(shape)


ACTIVATION_BYTES = 2.0
"""Bytes of one activation element: every calibrated unit runs bf16 activations, whatever its weights' dtype."""

TOKEN_ID_BYTES = 8.0
"""Bytes of one token id (int64): the embedding's input rows and the LM head's sampled tokens."""

# MLA models as calibration runs them (weight-absorbed decode, unabsorbed prefill; lynxsim/calib/kernels/mla.py):
# the per-head up-projections of the latent (kv_b: W_UK and W_UV) run inside the attention units.
MLA_DECODE_ATTENTION_KERNELS = 3  # q_nope absorbed through W_UK, latent attention, output un-absorbed by W_UV
MLA_PREFILL_ATTENTION_KERNELS = 2  # the latent decompressed by kv_b, causal attention
MLA_PROJECTION_KERNELS_OUTSIDE_Q = 2  # kv_a and the output projection (kv_b runs in the attention units)


class UnitWork(NamedTuple):
    """The least one call of a measured unit must do, at one or many grid points (arrays broadcast together).

    ``streamed_bytes``: weights, KV-cache entries and embedding rows, each read (or, for the embedding, written)
    once: what the roofline prices, as ``CostModel``'s components do. ``activation_bytes``: the activations
    the unit's GEMM or attention kernels read and write at its boundary, each once. The roofline leaves them
    out (``cost_formulas.unit_work`` states what it prices); the efficiency floors count them.
    """

    streamed_bytes: np.ndarray
    activation_bytes: np.ndarray
    flops: np.ndarray

    @property
    def total_bytes(self) -> np.ndarray:
        """Every byte the unit must move through device memory: the efficiency table's byte count."""
        return self.streamed_bytes + self.activation_bytes


class UnitRooflines(CostModel):
    """The roofline cost model, plus the work and the roofline time of each measured unit (one layer of it, or
    once per iteration). Each unit's work is stated once (``unit_work_parts``); its roofline and its efficiency
    floors (``lynxsim.calib.efficiency``) are both computed from that statement, so they cannot disagree. The
    measured cost model scales measured times with the rooflines outside a table's grid; a calibration dry run
    fills tables with them; calibration sizes its timing loops by them.

    Work per call, with H heads (one rank's), hidden size h, bf16 activations (2 bytes an element):
      moe(T, d)               streamed d * expert_bytes; activations 2 * T * h * 2 (token rows in, combined out);
                              FLOPs 2 * expert_params * T * top_k
      attention_decode(B, C)  streamed B * C * kv_bytes_per_token_layer; activations B * H * (qk_dim + v_dim) * 2
                              (q in, output out); FLOPs B * C * decode_flops_per_pair
      attention_prefill(T, C) streamed (C + T) * kv_bytes_per_token_layer; activations T * H * (qk_dim + v_dim) * 2;
                              FLOPs T * (C + (T + 1) / 2) * prefill_flops_per_pair (causal pairs)
      dense_layer(T)          streamed P * weight_bytes with P = attention projections + router + shared
                              experts; FLOPs 2 * P * T; activations T * [(2 h + H qk_dim + H v_dim) * 2
                              + kv_bytes_per_token_layer] (the stream row in and out, q out to attention, the
                              attention output in, the new KV entry written)
      dense_ffn_layer(T)      the same with P = attention projections + dense FFN
      dense_layer_gemms(T)    the GEMMs of dense_layer alone: dense_layer's weights, FLOPs and boundary activations
      embedding(T)            streamed T * h * (weight_bytes + 2) (rows read, rows written); activations T * 8
                              (token ids in); no FLOPs
      lm_head(S)              streamed vocab * h * weight_bytes; activations S * (h * 2 + 8) (rows in, token ids
                              out; a fused GEMM + argmax need not write the logits); FLOPs 2 * vocab * h * S
    MLA models (``attention.is_mla``; R = kv_lora_rank, Dn, Dr, Dv the nope, rope and value head dims) run
    the per-head up-projection kv_b (H * (Dn + Dv) * R weights) inside the attention units, as calibration's
    MLA kernels do: attention_decode adds the kv_b weights to its streamed bytes and 2 * B * H * R * (Dn + Dv)
    FLOPs (q_nope absorbed through W_UK, the output un-absorbed through W_UV) to the latent attention's;
    attention_prefill adds the kv_b weights and 2 * (C + T) * R * H * (Dn + Dv) FLOPs (the latent of every
    attended token decompressed); dense_layer and dense_ffn_layer leave kv_b out. ``CostModel`` itself (the
    iteration roofline) still prices kv_b with the dense GEMMs, once per layer at the batch's rows; so for MLA
    models the units' rooflines no longer sum to ``CostModel``'s (for GQA models they do, up to rounding, the
    embedding aside, which CostModel leaves out).

    The streamed bytes and FLOPs are ``cost_formulas.unit_work`` (what the compiled engine's extrapolation reads
    too), the activations ``x * activation bytes per row`` of the first axis.

    Roofline of a unit: max(streamed_bytes / sustained bandwidth, FLOPs / sustained FLOP/s of the unit's dtype)
    + its weight- or KV-streaming kernels * kernel_launch_s (``unit_kernels``). The GEMM units' (dense_layer,
    dense_ffn_layer, lm_head) equals ``CostModel``'s per-GEMM sum of maxima: every GEMM of one dtype turns
    compute-bound at the same row count, so the sum of maxima is the maximum of the sums.
    """

    def __init__(self, model: ModelSpec, hardware: HardwareProfile) -> None:
        super().__init__(model, hardware)
        attn = model.attention
        wbytes = model.weight_bytes_per_param
        if attn.is_mla:
            assert attn.kv_lora_rank and attn.qk_nope_head_dim and attn.v_head_dim
            kv_b_params = attn.num_heads * (attn.qk_nope_head_dim + attn.v_head_dim) * attn.kv_lora_rank
            projection_kernels = (2 if attn.q_lora_rank else 1) + MLA_PROJECTION_KERNELS_OUTSIDE_Q
            self._decode_attention_kernels = MLA_DECODE_ATTENTION_KERNELS
            self._prefill_attention_kernels = MLA_PREFILL_ATTENTION_KERNELS
        else:
            kv_b_params = 0
            projection_kernels = GQA_PROJECTION_KERNELS
            self._decode_attention_kernels = self._prefill_attention_kernels = ATTENTION_KERNELS_PER_LAYER
        self._kv_b_bytes = kv_b_params * wbytes
        self._kv_b_flops_per_row = 2.0 * kv_b_params  # absorption of a decode row, or decompression of a latent
        projection_params = model.attention_params - kv_b_params
        self._dense_layer_params = projection_params + model.router_params + model.shared_experts_params
        self._dense_ffn_layer_params = projection_params + model.dense_ffn_params
        self._dense_layer_kernels = (projection_kernels + ROUTER_KERNELS
                                     + (FFN_KERNELS if model.num_shared_experts else 0))
        self._dense_ffn_layer_kernels = projection_kernels + FFN_KERNELS
        self._lm_head_params = model.vocab_size * model.hidden_size
        heads_width = attn.num_heads * (attn.qk_head_dim + attn.v_dim)
        layer_activation_bytes_per_row = ((2 * model.hidden_size + heads_width) * ACTIVATION_BYTES
                                          + self._kv_bytes_per_token_layer)
        self._embedding_row_bytes = model.hidden_size * (wbytes + ACTIVATION_BYTES)
        # Activation bytes per row of a unit's first axis (token, decode row, chunk token, sequence).
        self._activation_bytes_per_row = {
            "moe": 2.0 * model.hidden_size * ACTIVATION_BYTES,  # token rows in, combined rows out
            "attention_decode": heads_width * ACTIVATION_BYTES,  # q in, output out
            "attention_prefill": heads_width * ACTIVATION_BYTES,
            "dense_layer": layer_activation_bytes_per_row,
            "dense_ffn_layer": layer_activation_bytes_per_row,
            "dense_layer_gemms": layer_activation_bytes_per_row,
            "embedding": TOKEN_ID_BYTES,  # token ids in
            "lm_head": model.hidden_size * ACTIVATION_BYTES + TOKEN_ID_BYTES,  # rows in, token ids out
        }

    def roofline_terms(self) -> dict[str, float]:
        """``CostModel.roofline_terms`` with each unit's own work (``cost_formulas.unit_work``): for MLA models
        the kv_b weights each attention call reads and the FLOPs per decode row (absorption) or attended row
        (decompression); the GEMM units' weights and FLOPs per row; each unit's FLOP/s and launches."""
        wbytes = self.model.weight_bytes_per_param
        terms = {
            **super().roofline_terms(),
            "attention_unit_bytes": self._kv_b_bytes,
            "attention_unit_flops_per_row": self._kv_b_flops_per_row,
            "dense_layer_bytes": self._dense_layer_params * wbytes,
            "dense_layer_flops_per_row": 2.0 * self._dense_layer_params,
            "dense_ffn_layer_bytes": self._dense_ffn_layer_params * wbytes,
            "dense_ffn_layer_flops_per_row": 2.0 * self._dense_ffn_layer_params,
            "embedding_row_bytes": self._embedding_row_bytes,
            "lm_head_bytes": self._lm_head_params * wbytes,
            "lm_head_flops_per_row": 2.0 * self._lm_head_params,
        }
        for unit in self._activation_bytes_per_row:
            terms[f"{unit}_flops_per_s"] = self.unit_flops_per_s(unit)
            terms[f"{unit}_launch_s"] = self.unit_kernels(unit) * self._launch_s
        return terms

    def unit_work_parts(self, unit: str) -> Callable[..., UnitWork]:
        """The work of ``unit`` (a measured or diagnostic unit, not ``graph_launch``, which times a launch and
        no work) as a function of its table's axes, split into what the roofline prices and what it does not."""
        if unit not in self._activation_bytes_per_row:
            known = ", ".join(self._activation_bytes_per_row)
            raise ValueError(f"unit {unit!r} has no work to count; units with work: {known}")
        formulas = _formulas()
        unit_id = formulas.UNIT_NAMES.index(unit)
        terms = formulas.terms_array(self.roofline_terms())
        per_row = self._activation_bytes_per_row[unit]

        def parts(*axes: ArrayLike) -> UnitWork:
            x0, x1, shape = _points(axes)
            work = np.empty((2, x0.size))
            formulas.unit_works(unit_id, terms, x0, x1, work)
            return UnitWork(streamed_bytes=work[0].reshape(shape), activation_bytes=(x0 * per_row).reshape(shape),
                            flops=work[1].reshape(shape))

        return parts

    def unit_work(self, unit: str) -> Callable[..., tuple[np.ndarray, np.ndarray]]:
        """(bytes, FLOPs) of ``unit`` as a function of its table's axes: the fewest bytes it must move through
        device memory (each weight and KV byte read once, activations read or written once) and its FLOPs."""
        parts = self.unit_work_parts(unit)

        def work(*axes: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
            w = parts(*axes)
            return w.total_bytes, w.flops

        return work

    def unit_flops_per_s(self, unit: str) -> float:
        """The sustained FLOP/s a unit's FLOPs run at: the experts' dtype for ``moe``, bf16 for attention (its
        operands are bf16 activations and KV entries), the weights' dtype for every GEMM unit."""
        if unit == "moe":
            return self._expert_flops_rate
        if unit in ("attention_decode", "attention_prefill"):
            return self._attention_flops_rate
        return self._dense_flops_rate

    def unit_kernels(self, unit: str) -> int:
        """Weight- or KV-streaming kernels of one call of ``unit``, each charged ``kernel_launch_s``."""
        kernels = {
            "moe": MOE_KERNELS_PER_LAYER,
            "attention_decode": self._decode_attention_kernels,
            "attention_prefill": self._prefill_attention_kernels,
            "dense_layer": self._dense_layer_kernels,
            "dense_ffn_layer": self._dense_ffn_layer_kernels,
            "dense_layer_gemms": self._dense_layer_kernels,
            "embedding": 1,
            "lm_head": LM_HEAD_KERNELS,
        }
        if unit not in kernels:
            raise ValueError(f"unit {unit!r} has no kernels to count; units with kernels: {', '.join(kernels)}")
        return kernels[unit]

    def unit_roofline(self, unit: str) -> Callable[..., np.ndarray]:
        """The roofline time of ``unit`` (one of ``MEASURED_UNITS`` or ``DIAGNOSTIC_UNITS``) as a function of
        its table's axes: max(streamed bytes / bandwidth, FLOPs / sustained FLOP/s) + launches; for
        ``graph_launch`` one launch per graph (``cost_formulas.unit_roofline``)."""
        formulas = _formulas()
        if unit not in formulas.UNIT_NAMES:
            raise ValueError(f"unit {unit!r} has no roofline; units: {', '.join(formulas.UNIT_NAMES)}")
        unit_id = formulas.UNIT_NAMES.index(unit)
        terms = formulas.terms_array(self.roofline_terms())

        def roofline(*axes: ArrayLike) -> np.ndarray:
            x0, x1, shape = _points(axes)
            out = np.empty(x0.size)
            formulas.unit_rooflines(unit_id, terms, x0, x1, out)
            return out.reshape(shape)

        return roofline


class MeasuredCostModel(UnitRooflines):
    """Iteration latency from kernel tables measured on a real GPU (``HardwareProfile.measured``), with the
    roofline only where a query leaves a table's grid (see ``TableInterpolator``).

    Prediction of one iteration, with L layers (of which M MoE layers and D dense ones), T tokens and S sequences:
      attention = L * (attention_decode(decode rows, their mean context)  if any decode rows
                       + sum over prefill chunks of attention_prefill(chunk, its cached context))
      dense     = M * dense_layer(T) + D * dense_ffn_layer(T) + embedding(T) + lm_head(S)
      moe       = sum over MoE layers l of moe(assignments_l / top_k, distinct experts of layer l)
      overhead  = graph_launch (measured, where the profile has it) + efficiency.iteration_overhead_s (CPU side)
    Each MoE layer is priced at its own distinct expert count, never at an average over layers
    (``cost_formulas.attention_s``, ``routed_experts_s``; the dense part tabulated by ``dense_parts_s``).
    """

    source = "measured"

    def __init__(self, model: ModelSpec, hardware: HardwareProfile, model_key: str,
                 units: Sequence[str] | None = None, moe_key: str | None = None) -> None:
        """``units``: the tables it must have, by default ``required_units(model)`` (an expert-parallel shard's
        base model leaves out ``moe``: its ranks' experts are priced by the instance, ``lynxsim.parallel``).
        ``moe_key``: the key of the ``moe`` table where it is not ``model_key``'s (quantized experts,
        ``expert_table_key``)."""
        super().__init__(model, hardware)
        self.model_key = model_key
        self.moe_key = moe_key or model_key
        tables = hardware.measured.tables
        names = {unit: table_name(self.moe_key if unit == "moe" else model_key, unit) for unit in MEASURED_UNITS}
        needed = units or required_units(model)
        missing = [names[u] for u in needed if names[u] not in tables]
        if missing:
            raise ValueError(f"hardware profile {hardware.name} lacks measured tables {', '.join(missing)}")
        for unit, axes in MEASURED_UNITS.items():
            name = names[unit]
            if name in tables and tables[name].axes != axes:
                raise ValueError(f"measured table {name} has axes {list(tables[name].axes)}, expected {list(axes)}")
        self.units: dict[str, TableInterpolator] = {
            unit: TableInterpolator(tables[names[unit]], self.unit_roofline(unit))
            for unit in MEASURED_UNITS
            if names[unit] in tables
        }
        self.gpu_overhead_s = self.units["graph_launch"].scalar(1.0) if "graph_launch" in self.units else 0.0
        self.cpu_overhead_s = hardware.efficiency.iteration_overhead_s
        self._overhead_s = self.gpu_overhead_s + self.cpu_overhead_s

    def dense_parts_s(self, max_tokens: int, max_sequences: int) -> tuple[np.ndarray, np.ndarray]:
        """``CostModel.dense_parts_s`` from the measured units: every layer's dense part at the batch's token
        count and the embedding, and the LM head per sequence."""
        tokens = np.arange(1, max_tokens + 1, dtype=np.float64)
        by_tokens = self._num_moe_layers * self.units["dense_layer"](tokens)
        if self.model.num_dense_layers:
            by_tokens += self.model.num_dense_layers * self.units["dense_ffn_layer"](tokens)
        by_tokens += self.units["embedding"](tokens)
        by_sequences = self.units["lm_head"](np.arange(1, max_sequences + 1, dtype=np.float64))
        return np.concatenate(([0.0], by_tokens)), np.concatenate(([0.0], by_sequences))

    def pricing(self, max_tokens: int) -> Pricing:
        """``CostModel.pricing`` with the measured tables, and room to remember each MoE layer's value per
        (assignments, distinct experts) up to ``max_tokens`` tokens. Without a ``moe`` table (an expert-parallel
        shard's base model, whose ranks the instance prices) the experts fall back to the roofline."""
        formulas = _formulas()
        tables, table_at = formulas.packed_tables(
            {formulas.UNIT_NAMES.index(unit): table.packed for unit, table in self.units.items()}
        )
        cache = np.full((1, 1), np.nan)
        if "moe" in self.units:
            rows = formulas.assignment_capacity(max_tokens, self.model.top_k) + 1
            cache = np.full((rows, self._num_experts + 1), np.nan)
        return super().pricing(max_tokens)._replace(kind=formulas.MEASURED, tables=tables, table_at=table_at,
                                                    experts_cache_s=cache)

    def per_layer_moe_s(self, expert_token_counts: np.ndarray) -> np.ndarray:
        """The MoE time of each MoE layer (s), for validation reports."""
        formulas = _formulas()
        activity = ExpertActivity.of_counts(np.asarray(expert_token_counts))
        out = np.empty(activity.distinct.size)
        formulas.routed_experts_layers_s(self._pricing_for(0), formulas.LAYER_EXPERTS,
                                         _int64(activity.distinct).reshape(-1, 1),
                                         _int64(activity.assignments).reshape(-1, 1), out)
        return out


def calibrated_shape_matches(model: ModelSpec, model_key: str) -> bool:
    """Whether ``model`` has the shape of catalog model ``model_key`` (the one calibration timed), up to
    fields that change no kernel (``COST_NEUTRAL_FIELDS``)."""
    from lynxsim.models.catalog import catalog_names, load_catalog_model

    if model_key not in catalog_names():
        return False
    return _kernel_fields(model) == _kernel_fields(load_catalog_model(model_key))


def _kernel_fields(model: ModelSpec) -> dict[str, object]:
    """The fields of ``model`` that change what a kernel computes, the experts' dtype spelled out (an
    ``expert_weight_dtype`` left out is the ``weight_dtype``, so writing it changes nothing)."""
    fields = model.model_dump(exclude=set(COST_NEUTRAL_FIELDS))
    fields["expert_weight_dtype"] = model.expert_weight_dtype or model.weight_dtype
    return fields


def expert_table_key(model: ModelSpec, model_key: str) -> str:
    """The key whose ``moe`` table prices ``model``'s routed experts: ``model_key`` where they are in the catalog
    model's dtype, ``<model_key>@<dtype>`` where ``model`` is that catalog model with quantized experts
    (``expert_weight_dtype: fp8``: ``mixtral-8x7b@fp8``, the table ``lynxsim calibrate --expert-dtype fp8``
    measures). The other units do not touch the experts: ``model_key``'s tables price them either way."""
    from lynxsim.models.catalog import catalog_names, load_catalog_model

    if model_key not in catalog_names():
        return model_key
    catalog = load_catalog_model(model_key)
    dtype = model.expert_weight_dtype or model.weight_dtype
    if dtype == (catalog.expert_weight_dtype or catalog.weight_dtype):
        return model_key
    return f"{model_key}@{dtype}"


def _with_catalog_experts(model: ModelSpec, model_key: str) -> ModelSpec:
    """``model`` with the catalog model's expert dtype (to compare the rest of its shape with the catalog's)."""
    from lynxsim.models.catalog import load_catalog_model

    return model.model_copy(update={"expert_weight_dtype": load_catalog_model(model_key).expert_weight_dtype})


def has_measured_tables(hardware: HardwareProfile, model: ModelSpec, model_key: str | None,
                        units: Sequence[str] | None = None) -> bool:
    """Whether ``hardware`` holds every table the measured cost model of ``model_key`` needs (``units``, by
    default ``required_units(model)``)."""
    if model_key is None:
        return False
    tables = hardware.measured.tables
    return all(table_name(model_key, unit) in tables for unit in (units or required_units(model)))


def make_cost_model(model: ModelSpec, hardware: HardwareProfile, model_key: str | None = None) -> CostModel:
    """The cost model a run uses: ``MeasuredCostModel`` when ``hardware`` has every measured table of the
    catalog model ``model_key`` and ``model`` has that model's calibrated shape, the roofline ``CostModel``
    otherwise. Its ``source`` ("measured" or "roofline") is what the run summary reports as ``cost_model``.

    Quantized experts (``model`` is the catalog model but for ``expert_weight_dtype``): measured where the profile
    also has the ``moe`` table of ``expert_table_key`` (``<model-key>@fp8/moe``), priced by the roofline
    otherwise, as any model without tables is (the run summary's ``cost_model`` says which)."""
    if model_key is None:
        return CostModel(model, hardware)
    moe_key = expert_table_key(model, model_key)
    if moe_key != model_key:
        if (calibrated_shape_matches(_with_catalog_experts(model, model_key), model_key)
                and has_measured_tables(hardware, model, model_key)
                and table_name(moe_key, "moe") in hardware.measured.tables):
            return MeasuredCostModel(model, hardware, model_key, moe_key=moe_key)
        return CostModel(model, hardware)
    if has_measured_tables(hardware, model, model_key) and calibrated_shape_matches(model, model_key):
        return MeasuredCostModel(model, hardware, model_key)
    return CostModel(model, hardware)


def memory_key(usable_bytes: float, activation_reserve_bytes: float) -> str:
    """The config key to change when weights and the activation reserve leave no room for the KV cache: the
    reserve when it alone takes the usable memory (a typo such as ``1e30``), else the hardware (or its count)."""
    return "serving.activation_reserve_bytes" if activation_reserve_bytes >= usable_bytes else "hardware"
