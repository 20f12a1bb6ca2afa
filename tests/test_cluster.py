"""Several co-located replicas behind a request router: routing rules by hand, every arrived request accounted for
(with preemption and cut-offs), the summary over several instances, and the deployment config."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import simpy
from hypothesis import given, settings
from hypothesis import strategies as st

from engine_stubs import LAYERS, ConstantCost, routing_step, spec
from lynxsim.config import DeploymentConfig, validate_experiment
from lynxsim.datatypes import RequestSpec
from lynxsim.engine import KVTransfer, LeastOutstandingRouter, Role, RoundRobinRouter
from lynxsim.errors import InputError
from lynxsim.metrics import summarize
from lynxsim.runner import run_experiment
from simpy_oracle import BlockPool, Cluster, Replica, Scheduler, run_alone
from simpy_oracle.cluster import requests_frame

ALLOWED_STATUSES = {
    "finished",
    "rejected_exceeds_kv_cache",
    "rejected_exceeds_max_num_batched_tokens",
    "cutoff_running",
    "cutoff_waiting",
    "cutoff_awaiting_transfer",
    "cutoff_transferring",
}


def make_cluster(
    roles: Sequence[Role],
    *,
    blocks: int | dict[str, int] = 1000,
    block_size: int = 4,
    max_seqs: int = 8,
    budget: int = 64,
    chunked: bool = True,
    latency_s: float = 1.0,
    policy: str = "topk",
    router: str = "round_robin",
    transfer: KVTransfer | None = None,
) -> Cluster:
    """A cluster of instances with the given roles; ``blocks`` may differ by role."""
    step = routing_step(policy)

    def instance(env: simpy.Environment, index: int, role: Role) -> Replica:
        count = blocks[role] if isinstance(blocks, dict) else blocks
        scheduler = Scheduler(
            BlockPool(count, block_size), max_num_seqs=max_seqs, max_num_batched_tokens=budget, chunked_prefill=chunked
        )
        return Replica(scheduler, ConstantCost(latency_s), step, LAYERS, env=env, index=index, role=role)  # type: ignore[arg-type]

    return Cluster.build(roles, instance, router=router, transfer=transfer)  # type: ignore[arg-type]


def check_accounting(
    cluster: Cluster, specs: Sequence[RequestSpec], cutoff: float | None, *, max_seqs: int, budget: int
) -> pd.DataFrame:
    """What holds for any run: every arrived request has one status, tokens sampled by iterations are the tokens
    requests generated, limits held per iteration, and after a drain every KV block is free again."""
    rows = requests_frame(cluster.arrived, cluster.statuses)
    arrived = [s for s in specs if cutoff is None or s.arrival_s < cutoff]
    assert len(rows) == len(arrived) and set(cluster.statuses) == {s.request_id for s in arrived}
    assert set(rows["status"]) <= ALLOWED_STATUSES
    finished = rows[rows["status"] == "finished"]
    assert (finished["generated_tokens"] == finished["output_tokens"]).all()
    assert (rows["generated_tokens"] <= rows["output_tokens"]).all()
    rejected = rows["status"].str.startswith("rejected")
    assert (rows.loc[rejected, "instance"] == -1).all() and (rows.loc[rejected, "generated_tokens"] == 0).all()
    assert rows.loc[~rejected, "instance"].between(0, len(cluster.instances) - 1).all()
    frame = cluster.iterations()
    sampled = int(frame["sampled_tokens"].sum()) if len(frame) else 0
    assert sampled == int(rows["generated_tokens"].sum())
    if len(frame):
        assert (frame["prefill_tokens"] + frame["decode_tokens"] <= budget).all()
        assert (frame["sequences"] <= max_seqs).all()
        assert frame["start_s"].is_monotonic_increasing
        # an instance runs one iteration at a time
        for _, own in frame.groupby("instance"):
            assert (own["start_s"].to_numpy()[1:] >= (own["start_s"] + own["latency_s"]).to_numpy()[:-1] - 1e-9).all()
    if cutoff is None:
        assert set(rows["status"]) <= {
            "finished", "rejected_exceeds_kv_cache", "rejected_exceeds_max_num_batched_tokens"
        }
        for instance in cluster.instances:
            assert instance.scheduler.pool.free_blocks == instance.scheduler.pool.num_blocks
            assert instance.outstanding == 0 and instance.scheduler.is_idle
            assert not instance.incoming and not instance.receiving and instance.scheduler.num_receiving == 0
    return rows


# ----- routers -----------------------------------------------------------------------------------------------------


def test_round_robin_assigns_in_turn() -> None:
    cluster = make_cluster(["colocated"] * 3)
    specs = [spec(i, 0.1 * i, prompt=4, output=3) for i in range(7)]
    cluster.run(specs, cutoff_s=None)
    rows = requests_frame(cluster.arrived, cluster.statuses)
    assert rows["instance"].tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert (rows["decode_instance"] == rows["instance"]).all() and rows["transfer_s"].isna().all()
    frame = cluster.iterations()
    assert set(frame["role"]) == {"colocated"} and set(frame["instance"]) == {0, 1, 2}


def test_least_outstanding_picks_the_least_loaded() -> None:
    # Two replicas, 1 s iterations. r0 (t=0, long) -> 0 (tie: lowest index); r1 (t=0, one output token) -> 1,
    # which finishes it at t=1. At t=1.5 replica 0 has one outstanding request and replica 1 none:
    # r2 -> 1; r3 -> 0 (tie 1-1); r4 -> 1 (0 has 2, 1 has 1). Round robin would give 0, 1, 0, 1, 0.
    specs = [spec(0, 0.0, 4, 10), spec(1, 0.0, 4, 1), spec(2, 1.5, 4, 3), spec(3, 1.5, 4, 3), spec(4, 1.5, 4, 3)]
    least = make_cluster(["colocated"] * 2, router="least_outstanding")
    least.run(specs, cutoff_s=None)
    assert requests_frame(least.arrived, least.statuses)["instance"].tolist() == [0, 1, 1, 0, 1]
    turn = make_cluster(["colocated"] * 2, router="round_robin")
    turn.run(specs, cutoff_s=None)
    assert requests_frame(turn.arrived, turn.statuses)["instance"].tolist() == [0, 1, 0, 1, 0]


class _Loaded:
    def __init__(self, outstanding: int) -> None:
        self.outstanding = outstanding


def test_routers_skip_instances_that_cannot_hold_the_request() -> None:
    pool = [_Loaded(n) for n in (3, 1, 1, 0)]
    least = LeastOutstandingRouter()
    assert least.pick(pool, [True] * 4) == 3  # type: ignore[arg-type]
    assert least.pick(pool, [True, True, True, False]) == 1  # type: ignore[arg-type]  # tie 1-1: lowest index
    turn = RoundRobinRouter()
    assert [turn.pick(pool, [True, False, True, True]) for _ in range(4)] == [0, 2, 3, 0]  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        least.pick(pool, [False] * 4)  # type: ignore[arg-type]


def test_one_instance_cluster_is_the_replica() -> None:
    specs = [spec(i, 0.3 * i, prompt=5 + 3 * i, output=2 + i) for i in range(8)]
    cluster = make_cluster(["colocated"], blocks=8, policy="lynx")
    cluster.run(specs, cutoff_s=None)
    scheduler = Scheduler(BlockPool(8, 4), max_num_seqs=8, max_num_batched_tokens=64, chunked_prefill=True)
    replica = Replica(scheduler, ConstantCost(1.0), routing_step("lynx"), LAYERS)  # type: ignore[arg-type]
    run_alone(replica, specs, cutoff_s=None)
    pd.testing.assert_frame_equal(
        requests_frame(cluster.arrived, cluster.statuses), requests_frame(replica.arrived, replica.statuses)
    )
    pd.testing.assert_frame_equal(cluster.iterations(), replica.log.frame())


def test_preemption_on_several_replicas_recomputes_and_finishes() -> None:
    # 6 blocks of 4 tokens per replica; each request grows to 5 + 8 - 1 = 12 tokens = 3 blocks: three on one
    # replica cannot all stay, so round robin over two replicas of six requests preempts on both
    cluster = make_cluster(["colocated"] * 2, blocks=6)
    specs = [spec(i, 0.0, prompt=5, output=8) for i in range(6)]
    cluster.run(specs, cutoff_s=None)
    rows = check_accounting(cluster, specs, None, max_seqs=8, budget=64)
    assert (rows["status"] == "finished").all()
    assert rows.groupby("instance")["preemptions"].sum().gt(0).all()


def test_cluster_rejects_mixed_roles_and_a_missing_transfer() -> None:
    with pytest.raises(ValueError, match="roles"):
        make_cluster(["colocated", "decode"])
    with pytest.raises(ValueError, match="KVTransfer"):
        make_cluster(["prefill", "decode"])
    with pytest.raises(ValueError, match="roles"):
        make_cluster(["prefill", "prefill"], transfer=KVTransfer(1.0, 1.0))


@settings(max_examples=40, deadline=None)
@given(
    requests=st.lists(st.tuples(st.floats(0, 20), st.integers(1, 40), st.integers(1, 20)), min_size=1, max_size=25),
    replicas=st.integers(1, 4),
    router=st.sampled_from(["round_robin", "least_outstanding"]),
    blocks=st.integers(4, 40),
    max_seqs=st.integers(1, 8),
    budget=st.integers(1, 64),
    chunked=st.booleans(),
    cutoff=st.one_of(st.none(), st.floats(1, 60)),
    policy=st.sampled_from(["topk", "lynx"]),
)
def test_every_arrived_request_is_accounted_for_on_several_replicas(  # type: ignore[no-untyped-def]
    requests, replicas, router, blocks, max_seqs, budget, chunked, cutoff, policy
) -> None:
    specs = [spec(i, t, p, o) for i, (t, p, o) in enumerate(sorted(requests))]
    cluster = make_cluster(
        ["colocated"] * replicas, blocks=blocks, max_seqs=max_seqs, budget=budget, chunked=chunked,
        latency_s=0.25, policy=policy, router=router,
    )
    cluster.run(specs, cutoff_s=cutoff)
    rows = check_accounting(cluster, specs, cutoff, max_seqs=max_seqs, budget=budget)
    served = rows[~rows["status"].str.startswith("rejected")]
    assert (served["decode_instance"] == served["instance"]).all()
    if router == "round_robin":  # every request the router placed went to the next replica in turn
        assert served["instance"].tolist() == [i % replicas for i in range(len(served))]


# ----- whole runs --------------------------------------------------------------------------------------------------

SMALL = {
    "name": "small",
    "model": "qwen3-30b-a3b",
    "hardware": "h200",
    "workload": {
        "arrival": {"kind": "poisson", "rate_per_s": 16.0},
        "prompt_tokens": {"kind": "uniform", "low_tokens": 16, "high_tokens": 200},
        "output_tokens": {"kind": "uniform", "low_tokens": 4, "high_tokens": 40},
    },
    "serving": {"max_num_seqs": 16, "max_num_batched_tokens": 512},
    "deployment": {"replicas": 3, "router": "least_outstanding"},
    "policies": [{"name": "topk"}, {"name": "lynx"}],
    "simulation": {"seed": 5, "num_requests": 40, "warmup_s": 0.3},
}


def run_small(tmp_path: Path | None = None, **changes: object):  # type: ignore[no-untyped-def]
    return run_experiment(validate_experiment({**SMALL, **changes}), tmp_path)


def test_replicas_run_deterministically_and_summarize_over_all_instances(tmp_path: Path) -> None:
    first, second = run_small(tmp_path), run_small()
    for a, b in zip(first.runs, second.runs, strict=True):
        pd.testing.assert_frame_equal(a.requests, b.requests)
        pd.testing.assert_frame_equal(a.iterations, b.iterations)
    run = first.runs[1]
    assert (run.requests["status"] == "finished").all()
    assert set(run.requests["instance"]) == {0, 1, 2} and set(run.iterations["instance"]) == {0, 1, 2}
    assert run.summary["instances"] == 3.0
    # the summary is over every instance's iterations: throughput counts all their sampled tokens
    window = run.iterations[run.iterations["start_s"] >= 0.3]
    end_s = run.summary["simulated_s"]
    assert run.summary["output_tokens_per_s"] == pytest.approx(window["sampled_tokens"].sum() / (end_s - 0.3))
    assert run.summary["pure_decode_fraction"] == pytest.approx(window["pure_decode"].mean())
    assert run.summary["iterations"] == len(window)
    assert int(run.iterations["sampled_tokens"].sum()) == int(run.requests["generated_tokens"].sum())
    assert np.isnan(run.summary["transfer_mean_ms"])
    assert summarize(run.requests, run.iterations, warmup_s=0.3, end_s=end_s)["requests_finished"] == 40
    assert len(run.layers) == 48 and run.layers["mean_distinct_experts"].notna().all()
    stored = pd.read_parquet(tmp_path / "policies" / "lynx" / "iterations.parquet")
    assert {"instance", "role"} <= set(stored.columns)


def test_more_replicas_lower_latency_under_load() -> None:
    one = run_small(deployment={"replicas": 1}, policies=[{"name": "topk"}]).runs[0].summary
    three = run_small(policies=[{"name": "topk"}]).runs[0].summary
    assert three["mean_decode_batch"] < one["mean_decode_batch"]
    assert three["e2e_p50_s"] < one["e2e_p50_s"]


# ----- config ------------------------------------------------------------------------------------------------------


def test_deployment_defaults_are_one_colocated_instance() -> None:
    config = validate_experiment({**SMALL, "deployment": {}})
    assert config.deployment == DeploymentConfig()
    assert config.deployment.roles == ["colocated"]
    no_section = {key: value for key, value in SMALL.items() if key != "deployment"}
    assert validate_experiment(no_section).deployment.roles == ["colocated"]
    disaggregated = DeploymentConfig(mode="disaggregated", prefill_instances=2, decode_instances=3)
    assert disaggregated.roles == ["prefill", "prefill", "decode", "decode", "decode"]


@pytest.mark.parametrize(
    ("deployment", "message"),
    [
        ({"mode": "disaggregated", "replicas": 2}, "replicas does not apply to mode disaggregated"),
        ({"prefill_instances": 2}, "prefill_instances does not apply to mode colocated"),
        ({"replicas": 0}, "greater than 0"),
        ({"router": "random"}, "round_robin"),
        ({"mode": "disaggregated", "transfer_bandwidth_bytes_per_s": -1}, "greater than 0"),
        ({"replica": 2}, "unknown key"),
    ],
)
def test_bad_deployment_names_the_key(deployment: dict[str, object], message: str) -> None:
    with pytest.raises(InputError, match="deployment") as info:
        validate_experiment({**SMALL, "deployment": deployment})
    assert message in str(info.value)
