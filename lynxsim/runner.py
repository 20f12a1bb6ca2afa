"""One experiment: resolve the config into domain objects, simulate every policy on the same inputs, save.

Every policy of an experiment sees the same requests (drawn once from the seed) and the same router logits (the
routing source is a pure function of seed and token), so differences between policies are paired, not noise.
Each policy's records are written as soon as its simulation ends, so an interruption loses only the policy
being simulated.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import pandas as pd

from lynxsim import preflight, records
from lynxsim.config import ExperimentConfig, PluginRoutingConfig, PolicyConfig, ServingConfig
from lynxsim.cost import CostModel
from lynxsim.datatypes import RequestTable
from lynxsim.engine import BlockPool, KVTransfer, RouterFactory, RoutingStep, Scheduler
from lynxsim.engine.offloading import ExpertOffloading, host_expert_bytes, plan_offloading
from lynxsim.engine.topk_unions import TopKUnions
from lynxsim.errors import InputError
from lynxsim.hardware import HardwareProfile, MeasuredKernels, load_hardware
from lynxsim.instance_cost import CostModelContext, InstanceCostModel
from lynxsim.metrics import layer_summary, summarize
from lynxsim.models import ModelSpec, load_catalog_model, model_from_hf_config
from lynxsim.parallel import ParallelPlan
from lynxsim.plugins import COST_MODELS, ROUTERS, ROUTING_SOURCES, SCHEDULERS, Registry
from lynxsim.policies import Policy, TopK, calibrate_if_needed, check_policy, make, needs_calibration
from lynxsim.routing import RoutingSource
from lynxsim.routing.base import RoutingContext
from lynxsim.routing.evidence import routing_evidence
from lynxsim.routing.statistical import (
    ActivityTable,
    StatisticalRouting,
    build_activity_table,
    code_digest,
    default_sizes,
)
from lynxsim.routing.table_cache import cached_table
from lynxsim.workload import generate_requests
from lynxsim.workload.arrivals import ClosedLoopArrivals
from lynxsim.yaml_input import validated

T = TypeVar("T")



@dataclass(frozen=True)
class PolicyRun:
    """The records of one policy's simulation."""

    label: str
    policy: PolicyConfig
    requests: pd.DataFrame
    iterations: pd.DataFrame
    layers: pd.DataFrame
    summary: dict[str, float]
    wall_s: float


SchedulerFactory = Callable[..., Scheduler]
"""A registered scheduler with its parameters bound, called with a KV-cache pool and the serving limits."""


@dataclass(frozen=True)
class Setup:
    """Everything resolved from a config that all policies share."""

    config: ExperimentConfig
    model: ModelSpec
    hardware: HardwareProfile
    cost_model: InstanceCostModel
    kv_cache_blocks: int
    requests: RequestTable
    routing: RoutingSource
    policies: list[tuple[str, PolicyConfig, Policy]]
    scheduler: SchedulerFactory
    router: RouterFactory
    plan: ParallelPlan = field(default_factory=ParallelPlan)
    offloading: ExpertOffloading | None = None  # experts in host memory (``offloading``)

    @property
    def routing_evidence(self) -> str:
        """What stands behind this run's routing (``lynxsim.routing.evidence``)."""
        return routing_evidence(self.config.routing, self.config.model.name, self.model.name)

    @property
    def gpus_per_instance(self) -> int:
        return self.plan.gpus

    @cached_property
    def topk_unions(self) -> TopKUnions | None:
        """Top-k unions of token blocks that the policies of this run share (``lynxsim.engine.topk_unions``):
        only worth keeping when several policies route the same tokens."""
        if len(self.policies) < 2:
            return None
        return TopKUnions(self.model.num_moe_layers, self.model.num_experts)

    @cached_property
    def statistical_baseline(self) -> ActivityTable:
        """Statistical routing mode: the top-k table, up to the largest iteration. Built on first use (a run
        whose policies all apply to every iteration never needs it) and then shared by every policy."""
        return build_statistical_table(self, make("topk"), with_prefill=True)


@dataclass(frozen=True)
class ExperimentResult:
    setup: Setup
    runs: list[PolicyRun]

    def summary_frame(self) -> pd.DataFrame:
        """One row per policy, plus ``<metric>_ratio`` columns against the first policy."""
        frame = pd.DataFrame([run.summary for run in self.runs], index=[run.label for run in self.runs])
        frame.index.name = "policy"
        baseline = frame.iloc[0]
        ratios = frame.divide(baseline.replace(0, np.nan)).add_suffix("_ratio")
        return pd.concat([frame, ratios], axis=1)


def resolve_model(config: ExperimentConfig) -> ModelSpec:
    section = config.model
    if section.name is not None:
        spec = load_catalog_model(section.name)
    else:
        assert section.hf_config is not None
        spec = model_from_hf_config(section.hf_config)
    if not section.overrides:
        return spec
    return validated(ModelSpec, {**spec.model_dump(), **section.overrides}, "model.overrides")


def resolve_hardware(config: ExperimentConfig) -> HardwareProfile:
    """The experiment's hardware profile as the experiment prices it: without its measured tables when
    ``measured_tables`` is false, and with the efficiency figures of ``overrides`` in place of the profile's."""
    section = config.hardware
    hardware = load_hardware(section.profile)
    if not section.measured_tables:
        hardware = hardware.model_copy(update={"measured": MeasuredKernels()})
    replaced = section.overrides.efficiency.model_dump(exclude_none=True)
    if replaced:
        hardware = hardware.model_copy(update={"efficiency": hardware.efficiency.model_copy(update=replaced)})
    return hardware


def resolve_policy(index: int, entry: PolicyConfig, model: ModelSpec) -> Policy:
    """Build one policy; Lynx's (alpha, beta) default to the model's published constants."""
    params = entry.params
    if entry.name == "lynx":
        if "alpha" not in params:
            if model.lynx_alpha is None:
                raise InputError(
                    f"policies[{index}].alpha",
                    f"model {model.name} has no published Lynx constants: set alpha (and beta) for this policy",
                )
            params = {"alpha": model.lynx_alpha, "beta": model.lynx_beta, **params}
        params.setdefault("beta", model.lynx_beta)
    try:
        return make(entry.name, **params)
    except (ValueError, TypeError) as exc:
        raise InputError(f"policies[{index}]", str(exc)) from None


CALIBRATION_REQUESTS = 64
CALIBRATION_POSITIONS = 64
CALIBRATION_REQUEST_ID_BASE = 1 << 40
"""Calibration tokens come from request ids far above any workload's, so they never coincide with the tokens
the simulation routes: 64 requests x 64 positions, 4,096 tokens, enough for per-layer medians and usage counts."""


def bind_component(registry: Registry[T], name: str, params: dict[str, Any], where: str) -> Callable[..., T]:
    """``registry.bind``, its refusal (unknown name or parameter) an ``InputError`` at the config key ``where``."""
    try:
        return registry.bind(name, params)
    except ValueError as exc:
        raise InputError(where, str(exc)) from None


def make_component(factory: Callable[..., T], where: str, **engine_arguments: Any) -> T:
    """``factory(**engine_arguments)``, a value it refuses an ``InputError`` at the config key ``where``."""
    try:
        return factory(**engine_arguments)
    except (ValueError, TypeError) as exc:
        raise InputError(where, str(exc)) from None


def build_routing(config: ExperimentConfig, model: ModelSpec) -> RoutingSource:
    """The routing source of ``config.routing`` for ``model``, seeded from the experiment's seed: the factory
    registered as the section's ``kind`` (a plug-in's: its ``name``), given the section's other keys."""
    seed = int(np.random.SeedSequence([config.simulation.seed, 1]).generate_state(1)[0])
    section = config.routing
    if isinstance(section, PluginRoutingConfig):
        name, params = section.name, section.params
    else:
        name, params = section.kind, section.model_dump(exclude={"kind"})
    factory = bind_component(ROUTING_SOURCES, name, params, "routing")
    return make_component(factory, "routing", context=RoutingContext(model, config.model.name, seed))


def calibration_logits(routing: RoutingSource) -> np.ndarray:
    """Router logits ``[layers, tokens, experts]`` of a calibration sample drawn from the routing source."""
    request_ids = np.repeat(
        CALIBRATION_REQUEST_ID_BASE + np.arange(CALIBRATION_REQUESTS, dtype=np.int64), CALIBRATION_POSITIONS
    )
    positions = np.tile(np.arange(CALIBRATION_POSITIONS, dtype=np.int64), CALIBRATION_REQUESTS)
    return routing.logits(request_ids, positions)


def prepare_policies(
    config: ExperimentConfig, model: ModelSpec, routing: RoutingSource
) -> list[tuple[str, PolicyConfig, Policy]]:
    """Build, calibrate (where a policy measures its parameters on a sample) and check every policy."""
    built = [
        (entry.label or entry.name, entry, resolve_policy(i, entry, model)) for i, entry in enumerate(config.policies)
    ]
    sample = calibration_logits(routing) if any(needs_calibration(p) for _, _, p in built) else None
    ready = []
    for index, (label, entry, policy) in enumerate(built):
        try:
            if sample is not None:
                policy = calibrate_if_needed(policy, sample, model.top_k)
            check_policy(policy, model.num_moe_layers, model.num_experts, model.top_k)
        except ValueError as exc:
            raise InputError(f"policies[{index}]", str(exc)) from None
        ready.append((label, entry, policy))
    return ready


def prepare(config: ExperimentConfig) -> Setup:
    """Resolve the config; every user-facing problem surfaces here, before any simulation starts, at the file and
    line (or the ``--set``) of the key it concerns (``ExperimentConfig.locate``)."""
    try:
        return _prepare(config)
    except InputError as exc:
        raise InputError(config.locate(exc.where), exc.problem) from None


def _prepare(config: ExperimentConfig) -> Setup:
    model = resolve_model(config)
    hardware = resolve_hardware(config)
    parallelism = config.deployment.parallelism
    plan = ParallelPlan(parallelism.tensor_parallel, parallelism.expert_parallel)
    cost_model, kv_blocks = instance_cost_and_kv(config, model, hardware, plan)
    sim = config.simulation
    preflight.check_fits(config, model)  # before millions of requests are drawn, not after
    requests = generate_requests(
        config.workload.arrival,
        config.workload.prompt_tokens,
        config.workload.output_tokens,
        paired_lengths=config.workload.paired_lengths,
        seed=sim.seed,
        num_requests=sim.num_requests,
        duration_s=sim.duration_s,
        until_s=sim.cutoff_s,
    )
    if not config.serving.prefix_caching:
        requests.prefix = None  # no request shares a cached prefix: every prompt token is computed
    preflight.check_wall_time(config, model, requests)
    routing = build_routing(config, model)
    policies = prepare_policies(config, model, routing)
    setup = Setup(
        config, model, hardware, cost_model, kv_blocks, requests, routing, policies,
        scheduler=bind_component(SCHEDULERS, config.serving.scheduler.name, config.serving.scheduler.params,
                                 "serving.scheduler"),
        router=bind_component(ROUTERS, config.deployment.router.name, config.deployment.router.params,
                              "deployment.router"),
        plan=plan,
        offloading=plan_offloading(config, model, hardware, routing),
    )
    # one scheduler and one router made now, so that a parameter value they refuse stops the run before it starts
    make_component(build_scheduler, "serving.scheduler", setup=setup)
    make_component(setup.router, "deployment.router")
    return setup


def instance_cost_and_kv(
    config: ExperimentConfig, model: ModelSpec, hardware: HardwareProfile, plan: ParallelPlan
) -> tuple[InstanceCostModel, int]:
    """The one place that decides an instance's cost model and KV-cache size (every instance has both).

    The cost model is ``hardware.cost_model``'s (``lynxsim.plugins.COST_MODELS``; the built-in ``profile`` is
    ``make_cost_model`` on one GPU, a ``ParallelCostModel`` over more). One GPU: ``(memory * util - weights -
    reserve) / (block * kv_bytes_per_token)`` blocks. Over ``plan.gpus`` GPUs (``lynxsim.parallel``): every GPU
    holds its shard of the weights and its share of each token's KV cache, so the blocks are ``(memory * util -
    weights_per_gpu - reserve) / (block * kv_bytes_per_token_per_gpu)``: the token capacity grows with TP where KV
    heads split."""
    choice = config.hardware.cost_model
    factory = bind_component(COST_MODELS, choice.name, choice.params, "hardware.cost_model")
    cost_model = make_component(factory, "hardware.cost_model",
                                context=CostModelContext(model, hardware, config.model.name, plan))
    serving = config.serving
    offloaded = host_expert_bytes(config, model, hardware)
    if offloaded:  # one GPU and the built-in cost model (offload_capacity refuses others)
        assert isinstance(cost_model, CostModel)
        kv_bytes = cost_model.kv_cache_capacity_bytes(serving.gpu_memory_utilization,
                                                      serving.activation_reserve_bytes, offloaded)
    else:
        kv_bytes = cost_model.kv_cache_capacity_bytes(serving.gpu_memory_utilization,
                                                      serving.activation_reserve_bytes)
    kv_blocks = int(kv_bytes // (serving.block_size_tokens * cost_model.kv_bytes_per_token_per_gpu))
    if kv_blocks < 1:
        raise InputError("serving.gpu_memory_utilization", "leaves no room for a single KV-cache block")
    return cost_model, kv_blocks


def build_scheduler(setup: Setup) -> Scheduler:
    """A fresh scheduler of one instance (``serving.scheduler``'s): its KV-cache pool and the serving limits."""
    serving = setup.config.serving
    return setup.scheduler(
        pool=BlockPool(setup.kv_cache_blocks, serving.block_size_tokens),
        max_num_seqs=serving.max_num_seqs,
        max_num_batched_tokens=serving.max_num_batched_tokens,
        chunked_prefill=serving.chunked_prefill,
    )


def kv_transfer(setup: Setup) -> KVTransfer:
    """KV-cache transfers between disaggregated instances: the configured bandwidth, else the GPU's interconnect.

    With tensor parallelism every GPU of the decode instance pulls its own share of the KV cache from its peer
    on the prefill instance, over its own link, all in parallel: the transfer moves ``kv_bytes_per_token_per_gpu``
    per token at the per-link bandwidth. With KV heads split (GQA, tp <= num_kv_heads) that is the whole cache
    at ``bandwidth * tp``; replicated heads (tp > num_kv_heads) and MLA's replicated latent move more per link."""
    deployment = setup.config.deployment
    bandwidth = deployment.transfer_bandwidth_bytes_per_s or setup.hardware.sustained_interconnect_bytes_per_s
    return KVTransfer(setup.cost_model.kv_bytes_per_token_per_gpu, bandwidth, deployment.transfer_latency_s)


STATISTICAL_SEED_STREAM = 2
"""The statistical mode's seed is drawn from the experiment's under its own stream (the routing source's is 1)."""


def statistical_seed(config: ExperimentConfig) -> int:
    return int(np.random.SeedSequence([config.simulation.seed, STATISTICAL_SEED_STREAM]).generate_state(1)[0])


def statistical_sizes(serving: ServingConfig, *, with_prefill: bool) -> np.ndarray:
    """The grid of a statistical table (``default_sizes``) up to the most tokens an iteration it serves can hold:
    ``max_num_batched_tokens``, or, for pure-decode iterations only (one token per sequence), at most
    ``max_num_seqs`` of them."""
    largest = serving.max_num_batched_tokens
    if not with_prefill:
        largest = min(largest, serving.max_num_seqs)
    return default_sizes(largest)


def build_statistical_table(setup: Setup, policy: Policy, *, with_prefill: bool) -> ActivityTable:
    """``policy``'s table over the run's routing source, tabulated by the run's cost model; its batches hold one
    token from each of up to ``max_num_seqs`` sequences, then a prefill chunk. Read from the table cache
    (``lynxsim.routing.table_cache``) when an earlier run built the same table; ``build_s`` is what this run
    spent on it (building, or reading)."""
    config, model = setup.config, setup.model
    sizes = statistical_sizes(config.serving, with_prefill=with_prefill)
    seed = statistical_seed(config)

    def build() -> ActivityTable:
        return build_activity_table(
            setup.routing,
            policy,
            top_k=model.top_k,
            renormalize=model.renormalize,
            activity=setup.cost_model.activity,
            sizes=sizes,
            samples=config.simulation.statistical_samples,
            seed=seed,
            num_experts=model.num_experts,
            max_sequences=config.serving.max_num_seqs,
        )

    parts = {
        "routing": config.routing.model_dump(mode="json"),
        "routing_seed": config.simulation.seed,
        "model": model.model_dump(mode="json"),
        "policy": repr(policy),
        "policy_code": code_digest(policy),
        "expert_parallel": setup.plan.expert_parallel if setup.plan.expert_parallel_on else 1,
        "sizes": sizes.tolist(),
        "samples": config.simulation.statistical_samples,
        "seed": seed,
        "max_sequences": config.serving.max_num_seqs,
    }
    table, spent_s, cached = cached_table(parts, build, use_cache=config.simulation.statistical_cache)
    return dataclasses.replace(table, build_s=spent_s, from_cache=cached)


def statistical_routing(setup: Setup, entry: PolicyConfig, policy: Policy) -> StatisticalRouting | None:
    """The tables a statistical-mode simulation of ``policy`` samples (None in exact mode). Top-k's own table
    is the shared baseline; another policy's covers the iterations it applies to (pure decode by default)."""
    if setup.config.simulation.routing_mode != "statistical":
        return None
    decode_only = entry.apply_to == "decode_only"
    if isinstance(policy, TopK):
        table = setup.statistical_baseline
    else:
        table = build_statistical_table(setup, policy, with_prefill=not decode_only)
    return StatisticalRouting(table, setup.statistical_baseline if decode_only else None)


ArrivalProgress = Callable[[int], None]
"""Called with the number of requests that have arrived in the simulation so far: a long run's progress."""


class PolicyProgress(Protocol):
    """``run_experiment``'s ``on_arrivals``: called with a policy's label, the requests arrived so far and (by
    keyword) the run's total."""

    def __call__(self, label: str, arrived: int, /, total: int) -> None: ...


def routing_step(setup: Setup, entry: PolicyConfig, policy: Policy) -> RoutingStep:
    """How the run chooses each iteration's experts under ``policy`` (its statistical tables built, or read from
    the cache, in the statistical mode)."""
    model = setup.model
    return RoutingStep(
        routing=setup.routing,
        policy=policy,
        baseline=make("topk"),
        apply_to=entry.apply_to,
        top_k=model.top_k,
        renormalize=model.renormalize,
        statistical=statistical_routing(setup, entry, policy),
        seed=statistical_seed(setup.config),
        unions=setup.topk_unions,
        offloading=setup.offloading,
    )


def simulate_policy(
    setup: Setup, label: str, entry: PolicyConfig, policy: Policy, on_arrivals: ArrivalProgress | None = None
) -> PolicyRun:
    config = setup.config
    model = setup.model
    started = time.perf_counter()
    step = routing_step(setup, entry, policy)
    statistical = step.statistical
    from lynxsim.engine.compiled.orchestrator import ClosedLoop, simulate_deployment  # numba: once a run starts

    deployment = config.deployment
    arrival = config.workload.arrival
    closed_loop = None
    if isinstance(arrival, ClosedLoopArrivals):
        until_s = config.simulation.duration_s
        closed_loop = ClosedLoop(arrival.clients, math.inf if until_s is None else until_s)
    outcome = simulate_deployment(
        deployment.roles, lambda: build_scheduler(setup), setup.cost_model, step, model.num_moe_layers,
        setup.requests, config.simulation.cutoff_s, setup.router,
        kv_transfer(setup) if deployment.mode == "disaggregated" else None, on_arrivals, closed_loop,
    )
    end_s, requests, iterations = outcome.end_s, outcome.requests, outcome.iterations()
    instances = len(outcome.logs)
    summary = summarize(
        requests,
        iterations,
        warmup_s=config.simulation.warmup_s,
        end_s=end_s,
        ttft_slo_s=config.slo.ttft_s,
        tpot_slo_s=config.slo.tpot_s,
    )
    summary["instances"] = float(instances)
    summary["gpus_per_instance"] = float(setup.plan.gpus)
    summary["gpus"] = float(instances * setup.plan.gpus)
    if statistical is not None:  # paid before the simulation, inside wall_s; the baseline once per run
        baseline = statistical.baseline
        summary["routing_table_build_s"] = statistical.policy.build_s
        summary["routing_table_cached"] = float(statistical.policy.from_cache)
        summary["routing_baseline_table_build_s"] = baseline.build_s if baseline is not None else 0.0
    wall_s = time.perf_counter() - started
    summary["wall_s"] = wall_s
    summary["simulated_s_per_wall_s"] = end_s / wall_s if wall_s > 0 else np.nan
    layers = layer_summary(iterations, warmup_s=config.simulation.warmup_s)
    return PolicyRun(label, entry, requests, iterations, layers, summary, wall_s)


def run_experiment(
    config: ExperimentConfig,
    out_dir: Path | None = None,
    on_policy_done: Callable[[PolicyRun], None] | None = None,
    on_arrivals: PolicyProgress | None = None,
) -> ExperimentResult:
    """Simulate every policy of ``config``; with ``out_dir``, write each policy's records as soon as it ends.
    ``on_arrivals(label, arrived, total)`` follows each policy's progress."""
    from lynxsim.engine.compiled.routing import compile_ahead  # numba: imported once a run starts

    compile_ahead()
    setup = prepare(config)
    if out_dir is None:
        return _simulate_all(setup, None, on_policy_done, on_arrivals)
    with records.staged_run_dir(out_dir) as stage:  # out_dir is replaced only once every policy has run
        return _simulate_all(setup, stage, on_policy_done, on_arrivals)


def _simulate_all(
    setup: Setup, out_dir: Path | None, on_policy_done: Callable[[PolicyRun], None] | None,
    on_arrivals: PolicyProgress | None,
) -> ExperimentResult:
    """Every policy of ``setup`` in turn, each one's records written to ``out_dir`` (if any) as it ends."""
    if out_dir is not None:
        write_setup(setup, out_dir)
    runs: list[PolicyRun] = []
    for label, entry, policy in setup.policies:
        progress = None
        if on_arrivals is not None:
            progress = functools.partial(on_arrivals, label, total=len(setup.requests))
        run = simulate_policy(setup, label, entry, policy, progress)
        runs.append(run)
        if out_dir is not None:
            write_policy_run(run, out_dir)
        if on_policy_done is not None:
            on_policy_done(run)
    result = ExperimentResult(setup, runs)
    if out_dir is not None:
        write_summary(result, out_dir)
    return result


# ----- results on disk -------------------------------------------------------------------------------------------


def write_setup(setup: Setup, out_dir: Path) -> None:
    """``config.resolved.yaml``: the experiment as validated, and what it resolved to."""
    resolved: dict[str, Any] = setup.config.model_dump(mode="json")
    resolved["resolved"] = {
        "model": setup.model.model_dump(mode="json"),
        "hardware": setup.hardware.name,
        "iteration_overhead_s": setup.hardware.efficiency.iteration_overhead_s,
        "cost_model": setup.cost_model.source,
        "routing_evidence": setup.routing_evidence,
        "kv_cache_blocks": setup.kv_cache_blocks,
        "requests": len(setup.requests),
        "instances": setup.config.deployment.roles,
        "gpus_per_instance": setup.plan.gpus,
        "gpus": len(setup.config.deployment.roles) * setup.plan.gpus,
    }
    if setup.config.deployment.mode == "disaggregated":
        resolved["resolved"]["transfer_bandwidth_bytes_per_s"] = kv_transfer(setup).bandwidth_bytes_per_s
    offloading = setup.offloading
    if offloading is not None:
        resolved["resolved"]["offloading"] = {
            "resident_experts_per_layer": offloading.capacity.tolist(),
            "host_expert_bytes": host_expert_bytes(setup.config, setup.model, setup.hardware),
            "host_link_bytes_per_s": offloading.host_bytes_per_s,
            "host_transfer_latency_s": offloading.latency_s,
        }
    records.write_resolved_config(out_dir, resolved)


def write_policy_run(run: PolicyRun, out_dir: Path) -> None:
    records.write_policy_records(out_dir, run.label, run.requests, run.iterations, run.layers, run.summary)


def write_summary(result: ExperimentResult, out_dir: Path) -> None:
    frame = result.summary_frame()
    records.write_run_summary(out_dir, frame, {
        "policies": [run.label for run in result.runs],
        "cost_model": result.setup.cost_model.source,
        "routing_mode": result.setup.config.simulation.routing_mode,
        "routing_evidence": result.setup.routing_evidence,
    })
