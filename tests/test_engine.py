"""The engine: hand-worked timelines, and every arrived request accounted for under any limits."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from engine_stubs import LAYERS, ConstantCost, routing_step, spec
from simpy_oracle import BlockPool, Replica, Scheduler, run_alone
from simpy_oracle.cluster import requests_frame


def make_replica(
    *, blocks: int = 1000, block_size: int = 4, max_seqs: int = 8, budget: int = 64, chunked: bool = True,
    latency_s: float = 1.0, policy: str = "topk",
) -> tuple[Replica, ConstantCost]:
    cost = ConstantCost(latency_s)
    scheduler = Scheduler(
        BlockPool(blocks, block_size), max_num_seqs=max_seqs, max_num_batched_tokens=budget, chunked_prefill=chunked
    )
    return Replica(scheduler, cost, routing_step(policy), LAYERS), cost  # type: ignore[arg-type]


def test_single_request_timeline() -> None:
    replica, _ = make_replica()
    end_s = run_alone(replica, [spec(0, 0.5, prompt=10, output=3)], cutoff_s=None)
    row = requests_frame(replica.arrived, replica.statuses).iloc[0]
    # prefill 0.5 -> 1.5 samples token 1; decodes 1.5 -> 2.5 and 2.5 -> 3.5 sample tokens 2 and 3
    assert row["ttft_s"] == 1.0 and row["finish_s"] == 3.5 and row["tpot_s"] == 1.0 and row["e2e_s"] == 3.0
    assert end_s == 3.5
    frame = replica.log.frame()
    assert list(frame["prefill_tokens"]) == [10, 0, 0] and list(frame["decode_tokens"]) == [0, 1, 1]
    assert list(frame["policy_applied"]) == [False, True, True]


def test_chunked_prefill_splits_prompt_and_mixes_decodes() -> None:
    replica, cost = make_replica(budget=4)
    run_alone(replica, [spec(0, 0.0, prompt=10, output=2), spec(1, 0.0, prompt=3, output=4)], cutoff_s=None)
    frame = replica.log.frame()
    # request 0 takes the whole budget in chunks of 4, 4, then 2 (+ 2 prompt tokens of request 1)
    assert list(frame["prefill_tokens"][:3]) == [4, 4, 4]
    assert cost.shapes[1].prefill_context_tokens.tolist() == [4]
    rows = requests_frame(replica.arrived, replica.statuses)
    assert rows.loc[0, "ttft_s"] == 3.0
    assert (frame["prefill_tokens"] > 0).any() and ((frame["prefill_tokens"] > 0) & (frame["decode_tokens"] > 0)).any()


def test_without_chunked_prefill_batches_are_pure() -> None:
    replica, _ = make_replica(chunked=False)
    run_alone(replica, [spec(0, 0.0, prompt=5, output=6), spec(1, 2.5, prompt=5, output=2)], cutoff_s=None)
    frame = replica.log.frame()
    assert not ((frame["prefill_tokens"] > 0) & (frame["decode_tokens"] > 0)).any()
    # request 1 arrives during iteration 3 (2 -> 3): iteration 4 is its prefill, pausing request 0's decode
    assert list(frame["prefill_tokens"][:5]) == [5, 0, 0, 5, 0]


def test_preemption_recomputes_and_finishes() -> None:
    # 6 blocks of 4 tokens; each request grows to 5 + 8 - 1 = 12 tokens = 3 blocks, so 3 cannot all stay
    replica, _ = make_replica(blocks=6, block_size=4)
    run_alone(replica, [spec(i, 0.0, prompt=5, output=8) for i in range(3)], cutoff_s=None)
    rows = requests_frame(replica.arrived, replica.statuses)
    assert (rows["status"] == "finished").all()
    assert rows["preemptions"].sum() > 0
    assert (rows["generated_tokens"] == rows["output_tokens"]).all()
    assert replica.scheduler.pool.free_blocks == 6


def test_request_larger_than_cache_is_rejected() -> None:
    replica, _ = make_replica(blocks=2, block_size=4)
    run_alone(replica, [spec(0, 0.0, prompt=20, output=4), spec(1, 0.0, prompt=3, output=2)], cutoff_s=None)
    assert replica.statuses == {0: "rejected_exceeds_kv_cache", 1: "finished"}


def test_scheduling_delay_is_the_wait_for_a_sequence_slot() -> None:
    replica, _ = make_replica(max_seqs=1)
    run_alone(replica, [spec(0, 0.0, prompt=4, output=3), spec(1, 0.0, prompt=4, output=3)], cutoff_s=None)
    rows = requests_frame(replica.arrived, replica.statuses)
    # request 1 waits for request 0's three iterations (1 s each) before its first scheduling
    assert rows["scheduling_delay_s"].tolist() == [0.0, 3.0]
    assert rows.loc[1, "ttft_s"] == 4.0


def test_cutoff_reports_unfinished_requests() -> None:
    replica, _ = make_replica(max_seqs=1)
    run_alone(replica, [spec(0, 0.0, prompt=4, output=10), spec(1, 0.0, prompt=4, output=10)], cutoff_s=3.5)
    assert replica.statuses == {0: "cutoff_running", 1: "cutoff_waiting"}


@settings(max_examples=40, deadline=None)
@given(
    requests=st.lists(
        st.tuples(st.floats(0, 20), st.integers(1, 40), st.integers(1, 20)), min_size=1, max_size=25
    ),
    blocks=st.integers(4, 60),
    max_seqs=st.integers(1, 8),
    budget=st.integers(1, 64),
    chunked=st.booleans(),
    cutoff=st.one_of(st.none(), st.floats(1, 60)),
    policy=st.sampled_from(["topk", "lynx"]),
)
def test_every_arrived_request_is_accounted_for(requests, blocks, max_seqs, budget, chunked, cutoff, policy) -> None:  # type: ignore[no-untyped-def]
    specs = [spec(i, t, p, o) for i, (t, p, o) in enumerate(sorted(requests))]
    replica, _ = make_replica(
        blocks=blocks, max_seqs=max_seqs, budget=budget, chunked=chunked, latency_s=0.25, policy=policy
    )
    run_alone(replica, specs, cutoff_s=cutoff)
    rows = requests_frame(replica.arrived, replica.statuses)
    arrived = [s for s in specs if cutoff is None or s.arrival_s < cutoff]
    assert len(rows) == len(arrived) and set(replica.statuses) == {s.request_id for s in arrived}
    finished = rows[rows["status"] == "finished"]
    assert (finished["generated_tokens"] == finished["output_tokens"]).all()
    if cutoff is None:
        assert set(rows["status"]) <= {
            "finished", "rejected_exceeds_kv_cache", "rejected_exceeds_max_num_batched_tokens"
        }
    frame = replica.log.frame()
    sampled = int(frame["sampled_tokens"].sum()) if len(frame) else 0
    assert sampled == int(rows["generated_tokens"].sum())
    if len(frame):
        assert (frame["prefill_tokens"] + frame["decode_tokens"] <= budget).all()
        assert (frame["sequences"] <= max_seqs).all()
