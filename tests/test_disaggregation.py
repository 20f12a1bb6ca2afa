"""Disaggregated prefill and decode instances: hand-worked timelines (TTFT at the prefill instance, the KV transfer
taking bytes / bandwidth exactly, then decode steps), the policy on every decode iteration, recomputation on the
decode instance, cut-offs in transfer, every arrived request accounted for, and whole runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from lynxsim.config import validate_experiment
from lynxsim.engine import KVTransfer
from lynxsim.runner import run_experiment
from simpy_oracle.cluster import requests_frame
from test_cluster import SMALL, check_accounting, make_cluster, spec

# 1 KiB of KV cache per token over 1 MiB/s: a 10-token prompt moves in 10240 / 1048576 = 0.009765625 s, exactly
KV_BYTES, BANDWIDTH = 1024.0, float(2**20)
TRANSFER = KVTransfer(kv_bytes_per_token=KV_BYTES, bandwidth_bytes_per_s=BANDWIDTH)


def tau(tokens: int) -> float:
    return tokens * KV_BYTES / BANDWIDTH


def test_single_request_timeline() -> None:
    cluster = make_cluster(["prefill", "decode"], transfer=TRANSFER, policy="lynx")
    end_s = cluster.run([spec(0, 0.5, prompt=10, output=3)], cutoff_s=None)
    row = requests_frame(cluster.arrived, cluster.statuses).iloc[0]
    t = tau(10)
    assert t == 0.009765625
    # prefill 0.5 -> 1.5 samples token 1 on instance 0; the KV cache moves 1.5 -> 1.5 + t;
    # decodes on instance 1 then sample tokens 2 and 3 at 2.5 + t and 3.5 + t
    assert row["first_token_s"] == 1.5 and row["ttft_s"] == 1.0
    assert row["transfer_wait_s"] == 0.0 and row["transfer_s"] == t
    assert row["finish_s"] == 3.5 + t and end_s == 3.5 + t
    assert row["tpot_s"] == (2.0 + t) / 2
    assert (row["instance"], row["prefill_instance"], row["decode_instance"]) == (0, 0, 1)
    frame = cluster.iterations()
    assert frame["role"].tolist() == ["prefill", "decode", "decode"]
    assert frame["instance"].tolist() == [0, 1, 1]
    assert frame["start_s"].tolist() == [0.5, 1.5 + t, 2.5 + t]
    assert frame["prefill_tokens"].tolist() == [10, 0, 0] and frame["decode_tokens"].tolist() == [0, 1, 1]
    assert frame["sampled_tokens"].tolist() == [1, 1, 1]
    assert frame["policy_applied"].tolist() == [False, True, True]
    prefill, decode = cluster.instances
    assert prefill.scheduler.pool.free_blocks == prefill.scheduler.pool.num_blocks
    assert decode.scheduler.pool.free_blocks == decode.scheduler.pool.num_blocks


def test_transfer_latency_adds_to_the_transfer() -> None:
    transfer = KVTransfer(KV_BYTES, BANDWIDTH, latency_s=0.25)
    cluster = make_cluster(["prefill", "decode"], transfer=transfer)
    cluster.run([spec(0, 0.0, prompt=10, output=2)], cutoff_s=None)
    row = requests_frame(cluster.arrived, cluster.statuses).iloc[0]
    assert row["transfer_s"] == 0.25 + tau(10) and row["finish_s"] == 1.0 + 0.25 + tau(10) + 1.0


def test_decode_instance_allocates_at_its_next_scheduling_step() -> None:
    # r0 (t=0, 4 + 5 tokens): prefill 0 -> 1; transfer 1 -> 1 + t; decodes from 1 + t, 1 s each.
    # r1 (t=1.25, 4 + 2 tokens): prefill 1.25 -> 2.25, while the decode instance runs 1 + t -> 2 + t -> 3 + t;
    # it allocates r1's blocks at 3 + t (wait 0.75 + t), the transfer ends at 3 + 2t, during the iteration
    # 3 + t -> 4 + t that decodes r0 alone; 4 + t -> 5 + t decodes both: r1's 2nd token, r0's 5th.
    t = tau(4)
    cluster = make_cluster(["prefill", "decode"], transfer=TRANSFER)
    cluster.run([spec(0, 0.0, prompt=4, output=5), spec(1, 1.25, prompt=4, output=2)], cutoff_s=None)
    rows = requests_frame(cluster.arrived, cluster.statuses)
    assert rows["first_token_s"].tolist() == [1.0, 2.25]
    assert rows["transfer_wait_s"].tolist() == [0.0, 0.75 + t]
    assert rows["transfer_s"].tolist() == [t, t]
    assert rows["finish_s"].tolist() == [5.0 + t, 5.0 + t]
    decode = cluster.iterations().query("role == 'decode'")
    assert decode["start_s"].tolist() == [1.0 + t, 2.0 + t, 3.0 + t, 4.0 + t]
    assert decode["decode_tokens"].tolist() == [1, 1, 1, 2]


def test_decode_instances_apply_the_policy_to_every_iteration() -> None:
    cluster = make_cluster(["prefill", "decode", "decode"], transfer=TRANSFER, policy="lynx", budget=16, max_seqs=4)
    specs = [spec(i, 0.2 * i, prompt=3 + (7 * i) % 30, output=2 + (5 * i) % 12) for i in range(30)]
    cluster.run(specs, cutoff_s=None)
    rows = check_accounting(cluster, specs, None, max_seqs=4, budget=16)
    assert (rows["status"] == "finished").all() and rows["preemptions"].sum() == 0
    frame = cluster.iterations()
    decode = frame[frame["role"] == "decode"]
    prefill = frame[frame["role"] == "prefill"]
    assert len(decode) and decode["policy_applied"].all() and decode["pure_decode"].all()
    assert (decode["mean_retained_mass"] < 1.0).any()  # lynx changed some routing there
    assert (prefill["decode_tokens"] == 0).all() and not prefill["policy_applied"].any()
    assert set(rows["decode_instance"]) == {1, 2}
    assert rows["decode_instance"].tolist() == [1 + i % 2 for i in range(30)]  # round robin over decode instances
    assert rows["transfer_s"].to_numpy() == pytest.approx(rows["prompt_tokens"].to_numpy() * KV_BYTES / BANDWIDTH)


def test_preemption_on_the_decode_instance_recomputes_there() -> None:
    # decode pool of 6 blocks of 4 tokens; each request grows to 5 + 8 - 1 = 12 tokens = 3 blocks
    cluster = make_cluster(
        ["prefill", "decode"], blocks={"prefill": 100, "decode": 6}, transfer=TRANSFER, policy="lynx"
    )
    specs = [spec(i, 0.0, prompt=5, output=8) for i in range(3)]
    cluster.run(specs, cutoff_s=None)
    rows = check_accounting(cluster, specs, None, max_seqs=8, budget=64)
    assert (rows["status"] == "finished").all() and rows["preemptions"].sum() > 0
    decode = cluster.iterations().query("role == 'decode'")
    recompute = decode[decode["prefill_tokens"] > 0]
    assert len(recompute) and not recompute["policy_applied"].any()  # a recompute is a prefill: plain top-k
    assert decode.loc[decode["pure_decode"], "policy_applied"].all()
    assert cluster.instances[0].scheduler.num_preemptions == 0


def test_a_request_that_fits_no_decode_instance_is_rejected_on_arrival() -> None:
    # prefill pool 3 blocks (12 tokens) holds the 10-token prompt; the decode pool of 3 blocks cannot hold
    # 10 + 5 - 1 = 14 tokens
    cluster = make_cluster(["prefill", "decode"], blocks=3, transfer=TRANSFER)
    cluster.run([spec(0, 0.0, prompt=10, output=5), spec(1, 0.0, prompt=10, output=2)], cutoff_s=None)
    assert cluster.statuses == {0: "rejected_exceeds_kv_cache", 1: "finished"}


def test_one_output_token_finishes_on_the_prefill_instance() -> None:
    cluster = make_cluster(["prefill", "decode"], transfer=TRANSFER)
    cluster.run([spec(0, 0.0, prompt=6, output=1)], cutoff_s=None)
    row = requests_frame(cluster.arrived, cluster.statuses).iloc[0]
    assert row["status"] == "finished" and row["finish_s"] == 1.0 and row["decode_instance"] == -1
    assert np.isnan(row["transfer_s"]) and set(cluster.iterations()["role"]) == {"prefill"}


def test_cutoff_reports_requests_in_transfer_and_awaiting_one() -> None:
    slow = KVTransfer(KV_BYTES, 1024.0)  # one token per second
    cluster = make_cluster(["prefill", "decode"], transfer=slow)
    cluster.run([spec(0, 0.0, prompt=4, output=3)], cutoff_s=2.5)  # prefill 0 -> 1, transfer 1 -> 5
    assert cluster.statuses == {0: "cutoff_transferring"}
    # a decode instance with one sequence slot: r1 waits there while r0 decodes
    cluster = make_cluster(["prefill", "decode"], transfer=TRANSFER, max_seqs=1)
    cluster.run([spec(0, 0.0, prompt=4, output=10), spec(1, 0.0, prompt=4, output=10)], cutoff_s=3.5)
    assert cluster.statuses == {0: "cutoff_running", 1: "cutoff_awaiting_transfer"}
    # the prefill instance still holds r1's prompt blocks; the decode instance holds r0's
    prefill, decode = cluster.instances
    assert prefill.scheduler.pool.free_blocks == prefill.scheduler.pool.num_blocks - 1
    assert decode.outstanding == 2 and prefill.outstanding == 1


@settings(max_examples=40, deadline=None)
@given(
    requests=st.lists(st.tuples(st.floats(0, 20), st.integers(1, 40), st.integers(1, 20)), min_size=1, max_size=25),
    prefill_instances=st.integers(1, 2),
    decode_instances=st.integers(1, 3),
    router=st.sampled_from(["round_robin", "least_outstanding"]),
    prefill_blocks=st.integers(4, 40),
    decode_blocks=st.integers(4, 40),
    max_seqs=st.integers(1, 8),
    budget=st.integers(1, 64),
    chunked=st.booleans(),
    cutoff=st.one_of(st.none(), st.floats(1, 60)),
    bandwidth=st.sampled_from([64.0, 4096.0, 2.0**20]),
    latency=st.sampled_from([0.0, 0.3]),
    policy=st.sampled_from(["topk", "lynx"]),
)
@example(  # a request arriving at the cut-off itself, after another: not accepted (the oracle's clock drifted below)
    requests=[(3.6, 1, 1), (0.8, 1, 1)], prefill_instances=1, decode_instances=1, router="round_robin",
    prefill_blocks=4, decode_blocks=4, max_seqs=1, budget=1, chunked=False, cutoff=3.6, bandwidth=64.0, latency=0.0,
    policy="topk",
)
def test_every_arrived_request_is_accounted_for_when_disaggregated(  # type: ignore[no-untyped-def]
    requests, prefill_instances, decode_instances, router, prefill_blocks, decode_blocks, max_seqs, budget, chunked,
    cutoff, bandwidth, latency, policy,
) -> None:
    specs = [spec(i, t, p, o) for i, (t, p, o) in enumerate(sorted(requests))]
    cluster = make_cluster(
        ["prefill"] * prefill_instances + ["decode"] * decode_instances,
        blocks={"prefill": prefill_blocks, "decode": decode_blocks},
        max_seqs=max_seqs, budget=budget, chunked=chunked, latency_s=0.25, policy=policy, router=router,
        transfer=KVTransfer(KV_BYTES, bandwidth, latency),
    )
    cluster.run(specs, cutoff_s=cutoff)
    rows = check_accounting(cluster, specs, cutoff, max_seqs=max_seqs, budget=budget)
    served = rows[~rows["status"].str.startswith("rejected")]
    assert served["instance"].between(0, prefill_instances - 1).all()
    moved = served[served["transfer_s"].notna()]
    assert moved["decode_instance"].between(prefill_instances, prefill_instances + decode_instances - 1).all()
    expected = latency + moved["prompt_tokens"].to_numpy() * KV_BYTES / bandwidth
    assert moved["transfer_s"].to_numpy() == pytest.approx(expected)
    assert (moved["transfer_wait_s"] >= 0).all()
    # only requests that generated past their first token went through a transfer, and all of them did
    assert (served.loc[served["generated_tokens"] >= 2, "transfer_s"].notna()).all()
    frame = cluster.iterations()
    if len(frame):
        prefill = frame[frame["role"] == "prefill"]
        assert (prefill["decode_tokens"] == 0).all() and (prefill["sampled_tokens"] <= prefill["sequences"]).all()
        decode = frame[frame["role"] == "decode"]
        assert decode.loc[decode["pure_decode"], "policy_applied"].all()
        if not rows["preemptions"].any():
            assert decode["pure_decode"].all()


# ----- whole runs --------------------------------------------------------------------------------------------------

DISAGGREGATED = {**SMALL, "deployment": {"mode": "disaggregated", "prefill_instances": 1, "decode_instances": 2}}


def run_disaggregated(tmp_path: Path | None = None, **deployment: object):  # type: ignore[no-untyped-def]
    config = {**DISAGGREGATED, "deployment": {**DISAGGREGATED["deployment"], **deployment}}  # type: ignore[dict-item]
    return run_experiment(validate_experiment(config), tmp_path)


def test_disaggregated_run_is_deterministic_and_reports_transfers(tmp_path: Path) -> None:
    first, second = run_disaggregated(tmp_path), run_disaggregated()
    for a, b in zip(first.runs, second.runs, strict=True):
        pd.testing.assert_frame_equal(a.requests, b.requests)
        pd.testing.assert_frame_equal(a.iterations, b.iterations)
        assert a.summary.keys() == b.summary.keys()
    lynx = first.runs[1]
    requests, iterations, summary = lynx.requests, lynx.iterations, lynx.summary
    assert (requests["status"] == "finished").all() and summary["instances"] == 3.0
    decode = iterations[iterations["role"] == "decode"]
    assert decode["policy_applied"].all() and set(decode["instance"]) == {1, 2}
    assert set(iterations.loc[iterations["role"] == "prefill", "instance"]) == {0}
    # Qwen3-30B-A3B: 48 layers x 4 KV heads x 128 x 2 (K, V) x 2 bytes = 98,304 B per token, over the H200's
    # NVLink at the 308 GB/s per direction two H200s sustained (lynxsim/hw_profiles/h200.yaml)
    moved = requests[requests["transfer_s"].notna()]
    assert moved["transfer_s"].to_numpy() == pytest.approx(moved["prompt_tokens"].to_numpy() * 98304 / 308e9)
    after = moved[moved["arrival_s"] >= 0.3]
    assert summary["transfer_mean_ms"] == pytest.approx(after["transfer_s"].mean() * 1e3)
    pure_decode = iterations.loc[iterations["start_s"] >= 0.3, "pure_decode"].mean()
    assert summary["pure_decode_fraction"] == pytest.approx(pure_decode)
    resolved = (tmp_path / "config.resolved.yaml").read_text()
    assert "transfer_bandwidth_bytes_per_s: 308000000000.0" in resolved


def test_transfer_bandwidth_and_latency_come_from_the_config() -> None:
    slow = run_disaggregated(transfer_bandwidth_bytes_per_s=1e9, transfer_latency_s=0.002).runs[0]
    moved = slow.requests[slow.requests["transfer_s"].notna()]
    assert moved["transfer_s"].to_numpy() == pytest.approx(0.002 + moved["prompt_tokens"].to_numpy() * 98304 / 1e9)


def test_paper_experiments_validate() -> None:
    from lynxsim.config import load_experiment

    root = Path(__file__).resolve().parents[1] / "experiments"
    colocated = load_experiment(root / "paper_qwen3_30b_colocated.yaml")
    disaggregated = load_experiment(root / "paper_qwen3_30b_disaggregated.yaml")
    assert colocated.deployment.roles == ["colocated"] and disaggregated.deployment.roles == ["prefill", "decode"]
    for config in (colocated, disaggregated):
        assert config.serving.max_num_seqs == 16 and config.model.name == "qwen3-30b-a3b"
    assert colocated.workload == disaggregated.workload and colocated.simulation == disaggregated.simulation
