"""The engine (lynxsim/engine/compiled) against the simpy oracle it restates (tests/simpy_oracle): the same
experiment gives the same requests, iterations and simulated end, for every scheduling mode, routing mode, cost
model and deployment (one instance, replicas behind either router, disaggregated prefill and decode)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
import simpy
from hypothesis import example, given, settings
from hypothesis import strategies as st

from engine_stubs import LAYERS, ConstantCost, routing_step, spec
from lynxsim.config import ExperimentConfig
from lynxsim.datatypes import BatchShape, ExpertActivity, LatencyBreakdown
from lynxsim.engine import BlockPool, KVTransfer, Role, Scheduler
from lynxsim.engine.compiled.orchestrator import simulate_deployment
from lynxsim.metrics import PER_LAYER_COLUMNS, per_layer
from lynxsim.plugins import ROUTERS
from lynxsim.runner import prepare, simulate_policy
from simpy_oracle import BlockPool as OraclePool
from simpy_oracle import Cluster as OracleCluster
from simpy_oracle import Replica as OracleReplica
from simpy_oracle import Scheduler as OracleScheduler
from simpy_oracle import oracle_run
from simpy_oracle.cluster import requests_frame

STATISTICAL = {"routing_mode": "statistical", "statistical_cache": False, "statistical_samples": 8}
WALL_CLOCK = {"wall_s", "simulated_s_per_wall_s", "routing_table_build_s", "routing_baseline_table_build_s"}


def _config(
    *, simulation: dict | None = None, hardware: dict | None = None, policies: list[dict] | None = None,
    parallelism: dict | None = None, model: str = "mixtral-8x7b", longest_prompt_tokens: int = 600,
    deployment: dict | None = None, rate_per_s: float = 6.0, **serving: object,
) -> ExperimentConfig:
    return ExperimentConfig.model_validate({
        "name": "engines",
        "deployment": {"parallelism": parallelism or {}, **(deployment or {})},
        "model": model,
        "hardware": {"profile": "h200", **(hardware or {})},
        "workload": {
            "arrival": {"kind": "poisson", "rate_per_s": rate_per_s},
            "prompt_tokens": {"kind": "uniform", "low_tokens": 16, "high_tokens": longest_prompt_tokens},
            "output_tokens": {"kind": "uniform", "low_tokens": 2, "high_tokens": 200},
        },
        "serving": {"max_num_seqs": 64, **serving},
        "policies": policies or [{"name": "topk"}, {"name": "lynx"}],
        "simulation": {"seed": 5, "num_requests": 60, **(simulation or {})},
        "output": {"figures": False},
    })


def _runs(config: ExperimentConfig, engine: str) -> dict[str, tuple[pd.DataFrame, pd.DataFrame, float]]:
    """Every policy's (requests, iterations, simulated end) on the ``engine`` or on the ``oracle``."""
    setup = prepare(config)
    runs = {}
    for label, entry, policy in setup.policies:
        if engine == "oracle":
            runs[label] = oracle_run(setup, entry, policy)
        else:
            run = simulate_policy(setup, label, entry, policy)
            runs[label] = (run.requests, run.iterations, run.summary["simulated_s"])
    return runs


def _assert_same_frames(a: pd.DataFrame, b: pd.DataFrame) -> None:
    assert list(a.columns) == list(b.columns) and len(a) == len(b)
    for column in a.columns:
        if column in PER_LAYER_COLUMNS:
            x, y = per_layer(a[column]), per_layer(b[column])
        else:
            x, y = a[column].to_numpy(), b[column].to_numpy()
        if np.issubdtype(x.dtype, np.floating):
            assert np.allclose(x, y, rtol=1e-12, atol=1e-12, equal_nan=True), column
        else:
            assert (x == y).all(), column


CASES = {
    "chunked": _config(),
    "whole-prompts": _config(chunked_prefill=False),
    "preempting": _config(gpu_memory_utilization=0.64),
    "statistical": _config(simulation=STATISTICAL, gpu_memory_utilization=0.64),
    "cut-off": _config(simulation={"cutoff_s": 5.0}),
    "roofline": _config(hardware={"measured_tables": False}),
    "policy-on-every-iteration": _config(policies=[{"name": "topk"}, {"name": "lynx", "apply_to": "all"}]),
    "statistical-on-every-iteration": _config(
        simulation=STATISTICAL, policies=[{"name": "lynx", "apply_to": "all"}], max_num_batched_tokens=512
    ),
    # one policy, synthetic routing, few experts: the loop routes (engine.compiled.routing), no driver calls
    "routed-in-loop-lynx": _config(policies=[{"name": "lynx"}], gpu_memory_utilization=0.64),
    "routed-in-loop-topk": _config(policies=[{"name": "topk"}]),
    # every decode batch one token: the loop routes Lynx's one-token batches with the top-k kernel
    "routed-in-loop-lynx-one-at-a-time": _config(policies=[{"name": "lynx"}], max_num_seqs=1,
                                                 simulation={"num_requests": 12}),
    "routed-in-loop-lynx-everywhere": _config(policies=[{"name": "lynx", "apply_to": "all"}], chunked_prefill=False),
    "routed-in-loop-tp2": _config(policies=[{"name": "lynx", "alpha": 1.5, "beta": 2}],
                                  parallelism={"tensor_parallel": 2}),
    "routed-in-loop-many-experts": _config(policies=[{"name": "lynx", "alpha": 3, "beta": 4}], model="olmoe-1b-7b"),
    "tensor-parallel": _config(parallelism={"tensor_parallel": 2}),
    "expert-parallel": _config(parallelism={"tensor_parallel": 2, "expert_parallel": 2}),
    "expert-parallel-roofline": _config(parallelism={"expert_parallel": 2}, hardware={"measured_tables": False}),
    "expert-parallel-statistical": _config(parallelism={"tensor_parallel": 2, "expert_parallel": 2},
                                           simulation=STATISTICAL),
    # MLA: the attention units' kv_b work scales a measured table outside its grid (long prompts leave it)
    "mla-measured": _config(model="deepseek-v2-lite", max_num_batched_tokens=4096, simulation={"num_requests": 30},
                            longest_prompt_tokens=12000,
                            policies=[{"name": "topk"}, {"name": "lynx", "alpha": 1, "beta": 2}]),
    # several instances: replicas behind either router, disaggregated prefill and decode
    "replicas-round-robin": _config(deployment={"replicas": 3}, rate_per_s=15.0),
    "replicas-least-outstanding": _config(deployment={"replicas": 3, "router": {"name": "least_outstanding"}},
                                          rate_per_s=15.0, gpu_memory_utilization=0.64),
    "replicas-statistical-cut-off": _config(deployment={"replicas": 2, "router": {"name": "least_outstanding"}},
                                            simulation={**STATISTICAL, "cutoff_s": 4.0}, rate_per_s=15.0),
    "disaggregated": _config(deployment={"mode": "disaggregated", "prefill_instances": 2, "decode_instances": 2},
                             rate_per_s=15.0),
    "disaggregated-least-outstanding-short-of-blocks": _config(
        deployment={"mode": "disaggregated", "prefill_instances": 1, "decode_instances": 2,
                    "router": {"name": "least_outstanding"}, "transfer_bandwidth_bytes_per_s": 2e9,
                    "transfer_latency_s": 0.002},
        rate_per_s=15.0, gpu_memory_utilization=0.64, policies=[{"name": "lynx"}]),
    "disaggregated-cut-off": _config(
        deployment={"mode": "disaggregated", "prefill_instances": 2, "decode_instances": 1,
                    "transfer_bandwidth_bytes_per_s": 1e9},
        simulation={"cutoff_s": 3.0}, rate_per_s=15.0, gpu_memory_utilization=0.64),
    "disaggregated-statistical": _config(
        deployment={"mode": "disaggregated", "prefill_instances": 1, "decode_instances": 2}, simulation=STATISTICAL,
        rate_per_s=15.0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_engine_gives_the_oracles_records(case: str) -> None:
    config = CASES[case]
    oracle_runs = _runs(config, "oracle")
    engine_runs = _runs(config, "engine")
    for label, (requests, iterations, end_s) in oracle_runs.items():
        engine_requests, engine_iterations, engine_end_s = engine_runs[label]
        _assert_same_frames(requests, engine_requests)
        _assert_same_frames(iterations, engine_iterations)
        assert engine_end_s == pytest.approx(end_s, rel=1e-12)
    if case == "preempting":  # the case exists to exercise preemption: make sure it does
        assert max(requests["preemptions"].sum() for requests, _, _ in engine_runs.values()) > 0
    if case.endswith("cut-off"):
        statuses = set(engine_runs["topk" if "topk" in engine_runs else "lynx"][0]["status"])
        assert {"cutoff_running", "cutoff_waiting", "cutoff_transferring", "cutoff_awaiting_transfer"} & statuses
    if case.startswith("disaggregated"):
        requests = next(iter(engine_runs.values()))[0]
        assert (requests["decode_instance"] >= 0).any() and requests["transfer_s"].notna().any()


def test_the_engine_is_deterministic() -> None:
    config = CASES["statistical"]
    first, second = _runs(config, "engine"), _runs(config, "engine")
    for label in first:
        _assert_same_frames(first[label][1], second[label][1])


def test_every_request_is_accounted_for() -> None:
    """Conservation: every arrived request ends with exactly one status, finished ones with all their tokens,
    and the tokens sampled by the iterations are the tokens the requests generated."""
    for case in ("preempting", "disaggregated-least-outstanding-short-of-blocks", "replicas-least-outstanding"):
        for requests, iterations, _ in _runs(CASES[case], "engine").values():
            assert requests["request_id"].is_unique and len(requests) == 60
            finished = requests[requests["status"] == "finished"]
            assert (finished["generated_tokens"] == finished["output_tokens"]).all()
            # (disaggregated: the first token is sampled on a prefill instance, the others on decode instances)
            assert iterations["sampled_tokens"].sum() == requests["generated_tokens"].sum()


def test_the_loop_routes_where_it_can(monkeypatch: pytest.MonkeyPatch) -> None:
    """Synthetic routing of a top-k or Lynx policy is routed inside the loop, also when several policies share
    top-k unions of few experts; not many experts' shared unions, nor expert parallelism."""
    from lynxsim.engine import RoutingStep
    from lynxsim.engine.compiled.routing import fused_routing
    from lynxsim.policies import make

    def enabled(config: ExperimentConfig) -> bool:
        setup = prepare(config)
        label, entry, policy = setup.policies[-1]
        model = setup.model
        step = RoutingStep(setup.routing, policy, make("topk"), entry.apply_to, model.top_k, model.renormalize,
                           unions=setup.topk_unions)
        return fused_routing(step, setup.cost_model, np.arange(4), max_call_tokens=8, max_slots=4,
                             max_batch_tokens=8).enabled

    assert enabled(CASES["routed-in-loop-lynx"]) and enabled(CASES["routed-in-loop-tp2"])
    assert enabled(CASES["chunked"])  # two policies sharing the unions of 8 experts
    assert enabled(CASES["routed-in-loop-many-experts"])  # one policy of 64 experts
    many = [{"name": "topk"}, {"name": "lynx", "alpha": 3, "beta": 4}]
    assert not enabled(_config(policies=many, model="olmoe-1b-7b"))  # two policies sharing 64 experts' unions
    assert not enabled(_config(policies=[{"name": "lynx"}], parallelism={"expert_parallel": 2}))


def test_compiled_caches_are_flushed_when_a_source_they_carry_changes(tmp_path) -> None:  # noqa: ANN001
    """numba would load a loop compiled against an older version of a kernel it calls: the digest check flushes
    once per change of any source, and not again while nothing changes."""
    from lynxsim.engine.compiled.driver import flush_if_sources_changed

    sources = [tmp_path / "a.py", tmp_path / "b.py"]
    for path in sources:
        path.write_text("x = 1\n")
    marker = tmp_path / "cache" / "digest"
    flushes: list[int] = []
    assert flush_if_sources_changed(sources, marker, lambda: flushes.append(1))  # nothing recorded yet
    assert not flush_if_sources_changed(sources, marker, lambda: flushes.append(1))
    sources[1].write_text("x = 2\n")
    assert flush_if_sources_changed(sources, marker, lambda: flushes.append(1))
    assert not flush_if_sources_changed(sources, marker, lambda: flushes.append(1))
    assert len(flushes) == 2


@pytest.mark.parametrize("case", ["replicas-round-robin", "replicas-least-outstanding", "disaggregated"])
def test_progress_reaches_every_request(case: str) -> None:
    """A run's progress (the CLI's bars) counts arrivals up, in steps, to the run's requests."""
    setup = prepare(CASES[case])
    label, entry, policy = setup.policies[0]
    seen: list[int] = []
    simulate_policy(setup, label, entry, policy, seen.append)
    assert seen[-1] == len(setup.requests) and seen == sorted(seen) and len(seen) > 1


# ----- random deployments, hand-computable costs: the engine against the oracle --------------------------------


class ShapedCost(ConstantCost):
    """``ConstantCost`` plus a little per prefill token and per decode row: a prefill and a decode instance then
    end their iterations at different times, as real ones do, where equal constant latencies lined the two chains of
    events up exactly (a hand-off and a finish at the same instant, which the two engines may order differently)."""

    def iteration_activity(self, batch: BatchShape, activity: ExpertActivity) -> LatencyBreakdown:
        latency = super().iteration_activity(batch, activity)
        extra_s = 0.00131 * float(batch.prefill_chunk_tokens.sum()) + 0.00077 * batch.decode_context_tokens.size
        return dataclasses.replace(latency, moe_s=latency.moe_s + extra_s)


def _stub_runs(
    roles: list[str], specs: list, cutoff_s: float | None, *, blocks: dict[str, int], max_seqs: int, budget: int,
    chunked: bool, policy: str, router: str, transfer: KVTransfer | None,
) -> tuple[tuple[pd.DataFrame, pd.DataFrame, float], tuple[pd.DataFrame, pd.DataFrame, float]]:
    """The same deployment of instances priced by ``ShapedCost`` on the oracle and on the engine: each one's
    (requests, iterations, end)."""
    latency_s, block_size = 0.2371, 4
    step = routing_step(policy)

    def oracle_instance(env: simpy.Environment, index: int, role: Role) -> OracleReplica:
        scheduler = OracleScheduler(OraclePool(blocks[role], block_size), max_num_seqs=max_seqs,
                                    max_num_batched_tokens=budget, chunked_prefill=chunked)
        return OracleReplica(scheduler, ShapedCost(latency_s), step, LAYERS, env=env, index=index, role=role)  # type: ignore[arg-type]

    cluster = OracleCluster.build(roles, oracle_instance, router=router, transfer=transfer)  # type: ignore[arg-type]
    oracle_end_s = cluster.run(specs, cutoff_s)
    oracle = (requests_frame(cluster.arrived, cluster.statuses), cluster.iterations(), oracle_end_s)
    order = iter(roles)

    def make_scheduler() -> Scheduler:
        return Scheduler(BlockPool(blocks[next(order)], block_size), max_num_seqs=max_seqs,
                         max_num_batched_tokens=budget, chunked_prefill=chunked)

    run = simulate_deployment(roles, make_scheduler, ShapedCost(latency_s), step, LAYERS,  # type: ignore[arg-type]
                              specs, cutoff_s, ROUTERS.bind(router, {}), transfer)
    return oracle, (run.requests, run.iterations(), run.end_s)


@settings(max_examples=200, deadline=None)
@given(
    requests=st.lists(st.tuples(st.integers(0, 150), st.integers(1, 40), st.integers(1, 20)), min_size=1, max_size=25),
    layout=st.sampled_from([("colocated", 1, 0), ("colocated", 3, 0), ("disaggregated", 1, 1),
                            ("disaggregated", 2, 1), ("disaggregated", 1, 3)]),
    router=st.sampled_from(["round_robin", "least_outstanding"]),
    entry_blocks=st.integers(4, 40),
    decode_blocks=st.integers(4, 40),
    max_seqs=st.integers(1, 8),
    budget=st.integers(1, 64),
    chunked=st.booleans(),
    cutoff=st.one_of(st.none(), st.integers(2, 40)),
    bandwidth=st.sampled_from([70.0, 4000.0, 1.0e6]),
    transfer_latency=st.sampled_from([0.0, 0.3]),
    policy=st.sampled_from(["topk", "lynx"]),
)
# Two identical prompts prefilled together and handed to two idle decode instances at the same instant: a decode
# instance's clock once ran one ulp past the prefill iteration under way (its horizon was just past the prefill
# instance's frontier, which for an iteration under way is when it hands off), so one transfer started an ulp late
# and the two decode iterations at that instant came out in the other order.
@example(requests=[(0, 1, 2), (3, 1, 2), (3, 2, 2), (3, 2, 2)], layout=("disaggregated", 1, 3), router="round_robin",
         entry_blocks=4, decode_blocks=4, max_seqs=2, budget=4, chunked=False, cutoff=None, bandwidth=1.0e6,
         transfer_latency=0.0, policy="topk")
# A KV cache that reached a decode instance before the cut-off while its iteration ran: simpy puts the request in
# the running set at the transfer's end, the loop took it in only at its next iteration, which the cut-off stopped.
@example(requests=[(118, 9, 2), (119, 1, 2)], layout=("disaggregated", 1, 1), router="round_robin", entry_blocks=4,
         decode_blocks=4, max_seqs=2, budget=4, chunked=True, cutoff=13, bandwidth=1.0e6, transfer_latency=0.3,
         policy="topk")
def test_the_engine_gives_the_oracles_records_on_any_deployment(  # type: ignore[no-untyped-def]
    requests, layout, router, entry_blocks, decode_blocks, max_seqs, budget, chunked, cutoff, bandwidth,
    transfer_latency, policy,
) -> None:
    """Random requests on random co-located or disaggregated deployments, pools short of blocks, either router, a
    cut-off or none: every request and iteration record the same on both. Arrival times carry a distinct
    irrational part each (and the iteration latency and transfer rates are not multiples of one another), so no
    two events fall at the same instant, where the two engines may order them differently, except those one
    event makes at once (requests prefilled together, handed off together), which both order by instance."""
    specs = [spec(i, 0.1 * t + 0.001 * math.sqrt(2 + i), prompt, output)
             for i, (t, prompt, output) in enumerate(sorted(requests))]
    mode, entry_count, decode_count = layout
    entry_role = "colocated" if mode == "colocated" else "prefill"
    roles = [entry_role] * entry_count + ["decode"] * decode_count
    transfer = KVTransfer(1024.0, bandwidth, transfer_latency) if mode == "disaggregated" else None
    blocks = {"colocated": entry_blocks, "prefill": entry_blocks, "decode": decode_blocks}
    (requests_a, iterations_a, end_a), (requests_b, iterations_b, end_b) = _stub_runs(
        roles, specs, None if cutoff is None else cutoff + 0.0137, blocks=blocks, max_seqs=max_seqs,
        budget=budget, chunked=chunked, policy=policy, router=router, transfer=transfer,
    )
    _assert_same_frames(requests_a, requests_b)
    if len(iterations_a) or len(iterations_b):
        _assert_same_frames(iterations_a, iterations_b)
    assert end_b == pytest.approx(end_a, rel=1e-12)
