"""Tensor and expert parallelism of one serving instance: what each GPU holds, what it computes, and what the
GPUs exchange.

The rule (``deployment.parallelism``): an instance spans ``gpus = max(tensor_parallel, expert_parallel)`` GPUs.

* Attention and the dense layers always run tensor-parallel over all ``gpus`` (Megatron-style, as vLLM runs
  them): each GPU holds ``num_heads / gpus`` query heads, ``num_kv_heads / gpus`` KV heads (one, replicated,
  when ``gpus > num_kv_heads``, as vLLM replicates them; MLA's latent cache is replicated on every GPU, as in
  vLLM), ``1 / gpus`` of the dense-FFN and shared-expert widths and of the vocabulary (LM head, embedding). The
  router, the norms and MLA's down projections are replicated.
* Routed experts: with ``expert_parallel == 1`` every expert is TP-sharded (``expert_ffn_size / gpus`` per
  GPU). With ``expert_parallel > 1`` (which must then equal ``gpus``: ``tensor_parallel`` is 1 or
  ``expert_parallel``; vLLM's ``--enable-expert-parallel``) each expert lives whole on one EP rank, placed by an
  explicit ``placement`` array (expert -> rank; contiguous: expert ``e`` on rank ``e // (E / ep)``).

Per-GPU compute: the roofline of a TP-sharded model is the one-GPU roofline of the *sharded* ``ModelSpec``
(``shard_model``). The measured tables are timed at TP1, so for ``gpus > 1`` the measured model is used only
where the profile holds tables of ``<model-key>@tp<gpus>`` (timed on one rank of that TP group); otherwise the
roofline of the shard prices the iteration, and the run's ``cost_model`` string says so.

Expert parallelism, per MoE layer ``l`` and rank ``r``: ``d[l, r]`` distinct experts of rank ``r`` with a token,
``a[l, r]`` token-expert assignments on rank ``r``; rank time ``max(d * expert_bytes / bw, a * 2 * expert_params
/ flops) + launch`` (roofline), or a measured ``moe`` table at ``(a / top_k, d)``: one EP rank's own
(``<model-key>@ep<N>/moe``: its E/N experts timed on one GPU, ``lynxsim calibrate --expert-parallel N``) where
the profile has it, else the whole model's TP1 table; the layer's MoE time is its slowest rank's.

Communication (``LatencyBreakdown.communication_s``): each collective is priced by the profile's
``collective_cost(gpus)`` (``lynxsim.interconnect``): a measured table of time against per-GPU buffer bytes where
the profile has one for this GPU count (the H200 profile has in-graph NCCL tables at 2 GPUs), else ``lat +
wire_bytes / B`` (``lat`` the profile's ``efficiency.collective_latency_s``, ``B`` its sustained interconnect
bandwidth per GPU and direction). Activations travel in bf16 (2 bytes per element):

* all-reduce of ``T`` tokens: a buffer of ``T * hidden * 2`` bytes. Tensor parallelism runs two per layer
  (after attention, after the FFN/MoE). With expert parallelism: one per layer after attention, one per
  dense-FFN layer; the MoE layers' reduction is the combine below (shared experts' partial sums ride on it).
* expert parallelism, per MoE layer: dispatch and combine all-to-all. Tokens are assumed to start evenly spread
  over the ranks, so ``a[l, r] * (ep - 1) / ep`` of rank ``r``'s assignments arrive from other ranks (and return
  in the combine); each collective is priced at its busiest rank's buffer, ``max_r a[l, r] * hidden * 2``
  bytes, twice per layer.

Memory, per GPU: ``memory * utilization - weights_per_gpu - activation_reserve``; the instance's KV cache holds
that over ``kv_bytes_per_token_per_gpu`` tokens (the shard's KV bytes per token), so with KV heads split the
token capacity grows with ``gpus`` (``gpus * memory * util - weights - reserve * gpus`` in total when nothing is
replicated).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from lynxsim.cost import (
    CostModel,
    MeasuredCostModel,
    PricedCostModel,
    TableInterpolator,
    UnitRooflines,
    calibrated_shape_matches,
    has_measured_tables,
    make_cost_model,
    memory_key,
    required_units,
)
from lynxsim.datatypes import BatchShape, ExpertActivity, LatencyBreakdown
from lynxsim.errors import InputError
from lynxsim.hardware import HardwareProfile
from lynxsim.models.spec import ModelSpec

if TYPE_CHECKING:
    from lynxsim.cost_formulas import Pricing

ACTIVATION_BYTES = 2  # bf16 activations on the wire


@dataclass(frozen=True)
class ParallelPlan:
    """An instance's parallelism (see the module docstring for the rule)."""

    tensor_parallel: int = 1
    expert_parallel: int = 1

    def __post_init__(self) -> None:
        for name in ("tensor_parallel", "expert_parallel"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.expert_parallel > 1 and self.tensor_parallel not in (1, self.expert_parallel):
            raise ValueError("with expert_parallel > 1, tensor_parallel must be 1 or equal expert_parallel")

    @property
    def gpus(self) -> int:
        return max(self.tensor_parallel, self.expert_parallel)

    @property
    def expert_parallel_on(self) -> bool:
        return self.expert_parallel > 1


def check_plan(model: ModelSpec, plan: ParallelPlan) -> None:
    """Raise ``InputError`` (naming the config key) where ``model`` cannot be split as ``plan`` says."""
    g = plan.gpus
    attn = model.attention
    if plan.expert_parallel_on and model.num_experts % plan.expert_parallel:
        raise InputError(
            "deployment.parallelism.expert_parallel",
            f"{model.name}'s {model.num_experts} experts do not divide over {plan.expert_parallel} EP ranks",
        )
    if attn.num_heads % g:
        raise InputError(
            "deployment.parallelism.tensor_parallel",
            f"{model.name}'s {attn.num_heads} attention heads do not split over {g} GPUs",
        )
    if not attn.is_mla:
        kv = attn.num_kv_heads
        if (kv >= g and kv % g) or (kv < g and g % kv):
            raise InputError(
                "deployment.parallelism.tensor_parallel",
                f"{model.name}'s {kv} KV heads neither split over nor replicate evenly onto {g} GPUs",
            )


def shard_model(model: ModelSpec, plan: ParallelPlan) -> ModelSpec:
    """The ``ModelSpec`` of what one GPU holds and computes (experts whole under expert parallelism)."""
    g = plan.gpus
    if g == 1:
        return model
    attn = model.attention
    heads = attn.num_heads // g
    if attn.is_mla:
        kv_heads = 1  # MLA caches one latent per token, replicated on every rank; the field prices nothing
    else:
        kv_heads = max(1, attn.num_kv_heads // g)  # replicated (one per GPU) when g > num_kv_heads
    data = model.model_dump()
    data["name"] = f"{model.name} (1/{g} shard)"
    data["attention"] = {**data["attention"], "num_heads": heads, "num_kv_heads": kv_heads}
    data["vocab_size"] = math.ceil(model.vocab_size / g)
    if model.dense_ffn_size:
        data["dense_ffn_size"] = math.ceil(model.dense_ffn_size / g)
    if model.shared_expert_ffn_size:
        data["shared_expert_ffn_size"] = math.ceil(model.shared_expert_ffn_size / g)
    if not plan.expert_parallel_on:
        data["expert_ffn_size"] = math.ceil(model.expert_ffn_size / g)
    return ModelSpec.model_validate(data)


def expert_placement(num_experts: int, expert_parallel: int) -> np.ndarray:
    """Rank of each expert, contiguous: expert ``e`` on rank ``e // (num_experts / expert_parallel)``. An explicit
    array (rather than a formula at each use) so that a placement with replicas can replace it."""
    if expert_parallel < 1 or num_experts % expert_parallel:
        raise ValueError(f"{num_experts} experts do not divide over {expert_parallel} ranks")
    return np.arange(num_experts, dtype=np.int64) // (num_experts // expert_parallel)


def placement_matrix(placement: np.ndarray, ranks: int) -> np.ndarray:
    """One-hot ``[experts, ranks]`` matrix of a placement: ``counts @ matrix`` sums per rank."""
    matrix = np.zeros((placement.size, ranks), dtype=np.int64)
    matrix[np.arange(placement.size), placement] = 1
    return matrix


class ParallelCostModel(PricedCostModel):
    """Iteration latency of one instance spread over ``plan.gpus`` GPUs: per-GPU compute from ``base`` (a cost
    model of the shard), plus the MoE of the slowest EP rank, plus the collectives. Priced by the shared formulas
    (``lynxsim.cost_formulas``) on the shard's arrays with the collectives and the EP ranks' pricing added
    (``pricing``)."""

    def __init__(
        self,
        model: ModelSpec,
        hardware: HardwareProfile,
        plan: ParallelPlan,
        base: CostModel,
        source: str,
        moe_table: TableInterpolator | None = None,
    ) -> None:
        self.model = model
        self.shard = base.model
        self.hardware = hardware
        self.plan = plan
        self.base = base
        self.source = source
        self.rank_moe_table = moe_table  # the measured table that prices one EP rank's experts, if any
        # the constants its roofline extrapolates with: the whole model's (a rank's experts are whole)
        self.rank_roofline_terms = UnitRooflines(model, hardware).roofline_terms() if moe_table is not None else None
        self.collectives = hardware.collective_cost(plan.gpus)
        self._token_bytes = float(model.hidden_size * ACTIVATION_BYTES)
        if plan.expert_parallel_on:
            allreduces = model.num_layers + model.num_dense_layers
        else:
            allreduces = 2 * model.num_layers
        self._allreduces = allreduces
        self.placement = expert_placement(model.num_experts, plan.expert_parallel)
        self._onehot = placement_matrix(self.placement, plan.expert_parallel)
        self.cpu_overhead_s = base.cpu_overhead_s

    # ----- components -----

    def communication_parts_s(self, max_tokens: int, max_assignments: int) -> tuple[np.ndarray, np.ndarray]:
        """The collectives tabulated for the formulas (``cost_formulas.allreduce_s``, ``all_to_all_s``): every
        all-reduce of an iteration by its token count (``[max_tokens + 1]``), and one all-to-all by its busiest
        rank's assignments (``[max_assignments + 1]``, zero without expert parallelism)."""
        tokens = np.arange(max_tokens + 1, dtype=np.int64)
        allreduce = self._allreduces * self.collectives.time_s("all_reduce", tokens * self._token_bytes)
        assignments = np.arange(max_assignments + 1, dtype=np.int64)
        all_to_all = (self.collectives.time_s("all_to_all", assignments * self._token_bytes)
                      if self.plan.expert_parallel_on else np.zeros(assignments.size))
        return np.asarray(allreduce, dtype=np.float64), np.asarray(all_to_all, dtype=np.float64)

    def pricing(self, max_tokens: int) -> Pricing:
        """The shard's pricing arrays (``base.pricing``) with the collectives tabulated and, under expert
        parallelism, how each rank's experts are priced: by the measured table with the whole model's constants
        (its rooflines extrapolate it; a rank's experts are whole) where there is one, else by the shard's
        roofline."""
        from lynxsim import cost_formulas as formulas

        priced = self.base.pricing(max_tokens)
        assignments = formulas.assignment_capacity(max_tokens, self.model.top_k)
        allreduce, all_to_all = self.communication_parts_s(max_tokens, assignments)
        priced = priced._replace(allreduce_s=allreduce, all_to_all_s=all_to_all)
        if not self.plan.expert_parallel_on:
            return priced
        priced = priced._replace(ranks=self.plan.expert_parallel)
        if self.rank_moe_table is None or self.rank_roofline_terms is None:
            return priced
        table_at = priced.table_at.copy()
        table_at[formulas.RANK_MOE] = priced.tables.size
        rank_terms = formulas.terms_array(self.rank_roofline_terms)
        return priced._replace(
            rank_kind=formulas.MEASURED, terms=np.stack([priced.terms[formulas.LAYER_EXPERTS], rank_terms]),
            tables=np.concatenate([priced.tables, self.rank_moe_table.packed]), table_at=table_at,
            experts_cache_s=np.full((assignments + 1, self.model.num_experts + 1), np.nan),
        )

    def allreduce_time_s(self, batch: BatchShape) -> float:
        """Every all-reduce of the iteration (each of all the batch's tokens)."""
        from lynxsim import cost_formulas as formulas

        tokens = batch.num_tokens
        return float(formulas.allreduce_s(self._pricing_for(tokens), tokens))

    @property
    def needs_expert_counts(self) -> bool:
        """Expert parallelism prices each rank, so it needs every expert's tokens, not only per-layer totals."""
        return self.plan.expert_parallel_on

    def rank_activity(self, expert_token_counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per MoE layer and EP rank: distinct experts with a token, and token-expert assignments."""
        counts = np.asarray(expert_token_counts)
        distinct = (counts > 0).astype(np.int64) @ self._onehot
        assignments = counts.astype(np.int64) @ self._onehot
        return distinct, assignments

    def activity(self, expert_token_counts: np.ndarray) -> ExpertActivity:
        """Per MoE layer distinct experts and assignments, and per EP rank where experts are placed on ranks."""
        counts = np.asarray(expert_token_counts)
        if counts.shape != (self.model.num_moe_layers, self.model.num_experts):
            raise ValueError(
                f"expert_token_counts has shape {counts.shape}, expected "
                f"(num_moe_layers, num_experts) = ({self.model.num_moe_layers}, {self.model.num_experts})"
            )
        whole = ExpertActivity.of_counts(counts)
        if not self.plan.expert_parallel_on:
            return whole
        rank_distinct, rank_assignments = self.rank_activity(counts)
        return ExpertActivity(whole.distinct, whole.assignments, rank_distinct, rank_assignments)

    def ep_moe_layer_s(self, activity: ExpertActivity) -> np.ndarray:
        """Each MoE layer's routed-expert time: its slowest rank's (``cost_formulas.routed_experts_s``)."""
        from lynxsim import cost_formulas as formulas

        distinct, assignments = activity.rank_distinct, activity.rank_assignments
        if distinct is None or assignments is None:
            raise ValueError("expert parallelism prices each rank: the activity needs its per-rank arrays")
        out = np.empty(assignments.shape[0])
        formulas.routed_experts_layers_s(self._pricing_for(0), formulas.RANK_EXPERTS,
                                         np.asarray(distinct, dtype=np.int64), np.asarray(assignments, dtype=np.int64),
                                         out)
        return out

    def all_to_all_time_s(self, activity: ExpertActivity) -> float:
        """Dispatch and combine of every MoE layer (see the module docstring; ``cost_formulas.all_to_all_s``)."""
        from lynxsim import cost_formulas as formulas

        assert activity.rank_assignments is not None
        assignments = np.asarray(activity.rank_assignments, dtype=np.int64)
        return float(formulas.all_to_all_s(self._pricing_for(0, assignments), assignments))

    def gpu_time_s(self, latency: LatencyBreakdown) -> float:
        return latency.total_s - self.cpu_overhead_s

    # ----- memory -----

    @property
    def weight_bytes_per_gpu(self) -> float:
        """The shard's weights; under expert parallelism, only the rank's own experts (the most any rank holds)."""
        held = self.shard.weight_bytes
        if self.plan.expert_parallel_on:
            per_rank = int(np.bincount(self.placement, minlength=self.plan.expert_parallel).max())
            held -= self.model.num_moe_layers * (self.model.num_experts - per_rank) * self.model.expert_bytes
        return held

    @property
    def kv_bytes_per_token_per_gpu(self) -> float:
        return self.shard.kv_bytes_per_token

    def kv_cache_capacity_bytes(self, gpu_memory_utilization: float, activation_reserve_bytes: float) -> int:
        """KV-cache bytes per GPU: ``memory * utilization - weights_per_gpu - activation reserve``."""
        return _per_gpu_capacity(self, gpu_memory_utilization, activation_reserve_bytes)


def _per_gpu_capacity(cost: ParallelCostModel, utilization: float, reserve: float) -> int:
    # The same formula as CostModel.kv_cache_capacity_bytes, with this instance's per-GPU weights.
    weights = cost.weight_bytes_per_gpu
    if not 0.0 < utilization <= 1.0:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {utilization}")
    if reserve < 0:
        raise ValueError(f"activation_reserve_bytes must be non-negative, got {reserve}")
    usable = cost.hardware.memory_bytes * utilization
    capacity = usable - weights - reserve
    if capacity <= 0:
        raise InputError(
            memory_key(usable, reserve),
            f"{cost.model.name} weights {weights / 1e9:.1f} GB per GPU (over {cost.plan.gpus} GPUs) plus a "
            f"{reserve / 1e9:.1f} GB activation reserve do not fit in {usable / 1e9:.1f} GB of {cost.hardware.name}",
        )
    return int(capacity)


def make_instance_cost_model(
    model: ModelSpec, hardware: HardwareProfile, model_key: str | None, plan: ParallelPlan
) -> CostModel | ParallelCostModel:
    """The cost model of one instance. One GPU: exactly ``make_cost_model``. More: a ``ParallelCostModel`` over
    the shard's cost model, measured where the profile has ``<model-key>@tp<gpus>`` tables, roofline otherwise.
    Under expert parallelism the shard's own ``moe`` table is not needed (its experts are whole, on their
    ranks): each rank's experts are priced by ``<model-key>@ep<gpus>/moe`` (one rank's E/ep experts, timed on
    one GPU) where the profile has it, else by the whole model's measured ``moe`` table, else the roofline."""
    if plan.gpus == 1:
        return make_cost_model(model, hardware, model_key)
    check_plan(model, plan)
    shard = shard_model(model, plan)
    g = plan.gpus
    tp_key = f"{model_key}@tp{g}" if model_key else None
    shard_units = tuple(u for u in required_units(shard) if not (plan.expert_parallel_on and u == "moe"))
    if tp_key and has_measured_tables(hardware, shard, tp_key, shard_units) and calibrated_shape_matches(
            model, model_key or ""):
        base: CostModel = MeasuredCostModel(shard, hardware, tp_key, shard_units)
        source = f"measured ({tp_key} tables)"
    else:
        base = CostModel(shard, hardware)
        source = "roofline"
        if model_key and has_measured_tables(hardware, model, model_key):
            source = f"roofline (tp{g}: the measured tables are TP1; no {tp_key} tables)"
    moe_table = None
    if plan.expert_parallel_on:
        ep_table = f"{model_key}@ep{plan.expert_parallel}/moe" if model_key else None
        if ep_table and ep_table in hardware.measured.tables and calibrated_shape_matches(model, model_key or ""):
            moe_table = TableInterpolator(hardware.measured.tables[ep_table],
                                          UnitRooflines(model, hardware).unit_roofline("moe"))
            source += f"; experts per EP rank: measured {ep_table}"
        else:
            full = make_cost_model(model, hardware, model_key)
            if isinstance(full, MeasuredCostModel):
                moe_table = full.units["moe"]
                source += f"; experts per EP rank: measured {model_key}/moe (all experts on one GPU)"
    return ParallelCostModel(model, hardware, plan, base, source, moe_table)
