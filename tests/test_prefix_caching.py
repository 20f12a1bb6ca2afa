"""Prefix caching (vLLM v1's automatic prefix caching): block identities, hits, LRU eviction, and what a run reports."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine_stubs import LAYERS, ConstantCost, routing_step
from lynxsim.config import validate_experiment
from lynxsim.datatypes import PrefixIdentity, RequestTable
from lynxsim.engine import BlockPool, KVTransfer, Scheduler
from lynxsim.engine.compiled import kernel as k
from lynxsim.engine.compiled import prefix_cache as pc
from lynxsim.engine.compiled.driver import arrival_rejections, request_records, run_blocks, simulate
from lynxsim.engine.compiled.instance import CompiledInstance
from lynxsim.engine.compiled.orchestrator import simulate_deployment
from lynxsim.errors import InputError
from lynxsim.plugins import ROUTERS
from lynxsim.runner import run_experiment
from lynxsim.workload.traces import MOONCAKE_BLOCK_TOKENS, load_mooncake_jsonl, load_trace_table

BLOCK = 4


def table(rows: list[tuple[float, int, int]], groups: list[int] | None = None,
          keyed: list[int] | None = None) -> RequestTable:
    """Requests (arrival, prompt, output); with ``groups``, requests of a group share their first ``keyed`` tokens."""
    arrival, prompt, output = (np.array(column) for column in zip(*rows, strict=True))
    prefix = None if groups is None else PrefixIdentity.whole(np.array(groups), np.array(keyed))
    return RequestTable(np.arange(len(rows)), arrival.astype(float), prompt, output, prefix=prefix)


def serve(requests: RequestTable, *, blocks: int = 1000, budget: int = 64, max_seqs: int = 8,
          chunked: bool = True) -> tuple[pd.DataFrame, pd.DataFrame, CompiledInstance]:
    """One instance at 1 s an iteration: (requests, iterations, the instance after the run)."""
    scheduler = Scheduler(BlockPool(blocks, BLOCK), max_num_seqs=max_seqs, max_num_batched_tokens=budget,
                          chunked_prefill=chunked)
    n = len(requests)
    instance = CompiledInstance(scheduler, ConstantCost(1.0), routing_step(), LAYERS, n,  # type: ignore[arg-type]
                                blocks=run_blocks(requests, scheduler))
    instance.push(np.arange(n), requests.request_id, requests.arrival_s, requests.arrival_s, requests.prompt_tokens,
                  requests.output_tokens, arrival_rejections(requests, scheduler))
    instance.advance(math.inf)
    instance.finish()
    rows = np.arange(n)
    records = request_records([instance], np.zeros(n, dtype=np.int64), rows, requests, rows * 0, rows * 0,
                              instance.req_i[rows, k.R_STATUS])
    return records, instance.log().frame(), instance


def queue_invariants(instance: CompiledInstance) -> None:
    """The free queue holds exactly the free blocks: plain runs and the cached blocks no request holds."""
    cache = instance.prefix
    node, free, cached, previous = int(cache.meta[pc.P_HEAD]), 0, 0, -1
    while node >= 0:
        assert cache.node_prev[node] == previous
        if cache.node_block[node] == pc.ANONYMOUS:
            assert cache.node_count[node] > 0
            free += int(cache.node_count[node])
        else:
            assert cache.node_ref[node] == 0 and cache.entry_of[cache.node_block[node]] == node
            free += 1
            cached += 1
        previous, node = node, int(cache.node_next[node])
    assert cache.meta[pc.P_TAIL] == previous
    assert free == instance.state[k.S_FREE_BLOCKS] and cached == cache.meta[pc.P_EVICTABLE]


# ----- block identities -------------------------------------------------------------------------------------------


def test_block_identities_follow_units_and_stop_at_the_shared_tokens() -> None:
    # units of 8 tokens, blocks of 4: A's units (1, 2) give blocks ending at 3 and 7 of unit 1, then of unit 2; B
    # shares unit 1 only, and shares 12 tokens, so its third block (unit 3) is its own; C shares 5 tokens: one block
    prefix = PrefixIdentity(8, np.array([0, 2, 4]), np.array([2, 2, 1]), np.array([1, 2, 1, 3, 1]),
                            np.array([16, 12, 5]))
    blocks = pc.block_identities(prefix, 4)
    ids = [blocks.ids[s : s + c].tolist() for s, c in zip(blocks.starts, blocks.counts, strict=True)]
    assert [len(i) for i in ids] == [4, 3, 1]
    assert ids[1][:2] == ids[0][:2] and ids[1][2] not in ids[0] and ids[2] == ids[0][:1]
    assert blocks.num_identities == len(set(blocks.ids.tolist())) == 5


def test_a_whole_unit_names_a_group_at_any_block_size() -> None:
    prefix = PrefixIdentity.whole(np.array([7, 7, 9]), np.array([10, 33, 40]))
    blocks = pc.block_identities(prefix, 16)
    assert blocks.counts.tolist() == [0, 2, 2]
    assert blocks.ids[0] != blocks.ids[2]  # group 7 and group 9 share nothing


# ----- hits, by hand ----------------------------------------------------------------------------------------------


def test_a_shared_prefix_is_not_computed_again() -> None:
    # both share 8 tokens (2 blocks); request 1 arrives after request 0 finished: it finds both blocks cached and
    # computes its last 2 prompt tokens, attending to the 8 cached ones
    requests = table([(0.0, 10, 2), (5.0, 10, 2)], groups=[7, 7], keyed=[8, 8])
    records, iterations, instance = serve(requests)
    assert records["cached_tokens"].tolist() == [0, 8]
    assert iterations["prefill_tokens"].tolist() == [10, 0, 2, 0]
    assert records["ttft_s"].tolist() == [1.0, 1.0] and (records["status"] == "finished").all()
    queue_invariants(instance)
    assert instance.state[k.S_FREE_BLOCKS] == 1000 and instance.prefix.meta[pc.P_EVICTABLE] == 2


def test_a_request_always_computes_its_last_prompt_token() -> None:
    # a prompt of exactly two cached blocks: vLLM hits at most prompt - 1 tokens, so only the first block is taken
    requests = table([(0.0, 8, 2), (5.0, 8, 2)], groups=[7, 7], keyed=[8, 8])
    records, iterations, _ = serve(requests)
    assert records["cached_tokens"].tolist() == [0, 4]
    assert iterations["prefill_tokens"].tolist() == [8, 0, 4, 0]


def test_the_least_recently_freed_block_is_evicted_first_and_a_prompt_s_tail_before_its_head() -> None:
    # 4 blocks. A (group 1) holds 3 blocks, 2 of them cached; freed in reverse: its plain block, A1, then A0.
    # B (group 2) needs 3 blocks: the plain ones (the one A never took, and A's plain one), then evicts A1.
    # C (group 1) then finds A0 but not A1: a hit of one block.
    requests = table([(0.0, 9, 1), (5.0, 9, 1), (10.0, 9, 1)], groups=[1, 2, 1], keyed=[8, 8, 8])
    records, _, instance = serve(requests, blocks=4)
    assert records["cached_tokens"].tolist() == [0, 0, 4]
    queue_invariants(instance)


def test_requests_admitted_together_compute_a_new_prefix_each() -> None:
    # neither finds the other's blocks (both computed in the same iteration); the second copy is shared once full
    requests = table([(0.0, 10, 3), (0.0, 10, 3)], groups=[7, 7], keyed=[8, 8])
    records, iterations, instance = serve(requests)
    assert records["cached_tokens"].tolist() == [0, 0]
    assert iterations["prefill_tokens"].iloc[0] == 20
    queue_invariants(instance)
    assert instance.state[k.S_FREE_BLOCKS] == 1000


def test_whole_prompt_scheduling_counts_only_the_missing_tokens_against_the_budget() -> None:
    # without chunked prefill a prompt is admitted only whole: two 10-token prompts do not fit a budget of 12
    # together, but after a hit of 8 tokens each computes 2, and both are admitted at once
    rows = [(0.0, 10, 1), (5.0, 10, 1), (5.0, 10, 1)]
    _, without, _ = serve(table(rows), budget=12, chunked=False)
    records, cached, _ = serve(table(rows, groups=[7, 7, 7], keyed=[8, 8, 8]), budget=12, chunked=False)
    assert without["prefill_tokens"].tolist() == [10, 10, 10]
    assert cached["prefill_tokens"].tolist() == [10, 4] and records["cached_tokens"].tolist() == [0, 8, 8]


# ----- properties -------------------------------------------------------------------------------------------------

workloads = st.lists(st.tuples(st.integers(0, 60), st.integers(1, 40), st.integers(1, 12), st.integers(0, 3),
                               st.integers(0, 40)), min_size=1, max_size=20)


@settings(max_examples=60, deadline=None)
@given(rows=workloads, blocks=st.integers(12, 60), budget=st.integers(4, 64), chunked=st.booleans())
def test_every_request_is_accounted_for_and_the_free_queue_holds_every_free_block(
    rows: list[tuple[int, int, int, int, int]], blocks: int, budget: int, chunked: bool,
) -> None:
    requests = table([(a, p, o) for a, p, o, _, _ in rows], groups=[g for *_, g, _ in rows],
                     keyed=[min(s, p) for _, p, _, _, s in rows])
    records, iterations, instance = serve(requests, blocks=blocks, budget=budget, chunked=chunked)
    assert len(records) == len(rows) and records["status"].isin(
        ["finished", "rejected_exceeds_kv_cache", "rejected_exceeds_max_num_batched_tokens"]).all()
    queue_invariants(instance)
    assert instance.state[k.S_FREE_BLOCKS] == blocks  # every block came back
    finished = records["status"] == "finished"
    assert (records.loc[finished, "cached_tokens"] < records.loc[finished, "prompt_tokens"]).all()
    if records["preemptions"].sum() == 0:  # each prompt token computed once, or found cached
        computed = iterations["prefill_tokens"].sum() if len(iterations) else 0
        assert computed == (records["prompt_tokens"] - records["cached_tokens"])[finished].sum()


@settings(max_examples=40, deadline=None)
@given(rows=workloads, blocks=st.integers(12, 60), budget=st.integers(4, 64), chunked=st.booleans())
def test_prefixes_no_request_shares_change_nothing(
    rows: list[tuple[int, int, int, int, int]], blocks: int, budget: int, chunked: bool,
) -> None:
    """Every request its own group: its blocks are cached, queued and evicted, and no record moves (the free blocks
    are counted as without caching) until a preempted request finds its own blocks again when it is re-admitted."""
    plain = table([(a, p, o) for a, p, o, _, _ in rows])
    alone = table([(a, p, o) for a, p, o, _, _ in rows], groups=list(range(len(rows))),
                  keyed=[p + o - 1 for _, p, o, _, _ in rows])
    a, ia, _ = serve(plain, blocks=blocks, budget=budget, chunked=chunked)
    b, ib, instance = serve(alone, blocks=blocks, budget=budget, chunked=chunked)
    assert (b["cached_tokens"] == 0).all()
    if a["preemptions"].sum() == 0:
        pd.testing.assert_frame_equal(a, b)
        pd.testing.assert_frame_equal(ia, ib)
    queue_invariants(instance)


def test_the_same_run_gives_the_same_records() -> None:
    rng = np.random.default_rng(0)
    rows = [(float(t), int(p), int(o)) for t, p, o in zip(np.sort(rng.uniform(0, 50, 40)), rng.integers(5, 60, 40),
                                                          rng.integers(1, 20, 40), strict=True)]
    requests = table(rows, groups=list(rng.integers(0, 3, 40)), keyed=[p for _, p, _ in rows])
    first, second = serve(requests, blocks=40)[0], serve(requests, blocks=40)[0]
    pd.testing.assert_frame_equal(first, second)
    assert first["cached_tokens"].sum() > 0


def test_replicas_and_disaggregated_prefill_instances_cache_prefixes() -> None:
    requests = table([(float(i), 12, 3) for i in range(0, 40, 4)], groups=[1] * 10, keyed=[8] * 10)
    for roles in (["colocated", "colocated"], ["prefill", "decode"]):
        run = simulate_deployment(
            roles, lambda: Scheduler(BlockPool(200, BLOCK), max_num_seqs=8, max_num_batched_tokens=64,
                                     chunked_prefill=True),
            ConstantCost(1.0), routing_step(), LAYERS, requests, None, ROUTERS.bind("round_robin", {}),  # type: ignore[arg-type]
            KVTransfer(kv_bytes_per_token=1.0, bandwidth_bytes_per_s=1e9, latency_s=0.0))
        assert (run.requests["status"] == "finished").all()
        hits = run.requests["cached_tokens"].tolist()
        first_of_each = len([r for r in roles if r != "decode"])
        assert hits[:first_of_each] == [0] * first_of_each and set(hits[first_of_each:]) == {8}


def test_without_a_prefix_identity_the_engine_runs_as_before() -> None:
    requests = table([(0.0, 10, 2), (5.0, 10, 2)])
    scheduler = Scheduler(BlockPool(1000, BLOCK), max_num_seqs=8, max_num_batched_tokens=64, chunked_prefill=True)
    run = simulate(scheduler, ConstantCost(1.0), routing_step(), LAYERS, requests, None)  # type: ignore[arg-type]
    assert run.requests["cached_tokens"].tolist() == [0, 0]
    assert run.iterations()["prefill_tokens"].tolist() == [10, 0, 10, 0]  # the second prompt computed whole


# ----- where prefixes come from -----------------------------------------------------------------------------------


def test_mooncake_hash_ids_are_512_token_units_of_the_prompt(tmp_path: Path) -> None:
    path = tmp_path / "trace.jsonl"
    rows = [{"timestamp": 0, "input_length": 1100, "output_length": 5, "hash_ids": [0, 1, 2]},
            {"timestamp": 30, "input_length": 700, "output_length": 5, "hash_ids": [0, 3]}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    trace = load_mooncake_jsonl(path)
    assert trace.prefix is not None and trace.prefix.unit_tokens == MOONCAKE_BLOCK_TOKENS == 512
    blocks = pc.block_identities(trace.prefix, 16)
    assert blocks.counts.tolist() == [1100 // 16, 700 // 16]
    first, second = blocks.ids[:68], blocks.ids[68:]
    assert (first[:32] == second[:32]).all() and not set(first[32:]) & set(second[32:])


def test_a_malformed_hash_ids_field_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "trace.jsonl"
    path.write_text('{"timestamp": 0, "input_length": 10, "output_length": 5, "hash_ids": [0]}\n'
                    '{"timestamp": 1, "input_length": 10, "output_length": 5, "hash_ids": "0,1"}\n')
    with pytest.raises(InputError) as error:
        load_mooncake_jsonl(path)
    assert f"{path}:2" in str(error.value) and "hash_ids must be a list of integers" in str(error.value)


def test_a_session_s_turns_share_the_conversation_so_far(tmp_path: Path) -> None:
    path = tmp_path / "chat.csv"
    path.write_text("t,conv,prompt,output\n0,a,20,10\n1,b,20,10\n30,a,40,5\n31,,40,5\n")
    trace = load_trace_table(path, {"arrival": "t", "prompt": "prompt", "output": "output", "session": "conv"})
    assert trace.prefix is not None and trace.prefix.keyed_tokens.tolist() == [29, 29, 44, 44]
    groups = trace.prefix.unit_ids[trace.prefix.unit_starts]
    assert groups[0] == groups[2] and len({groups[0], groups[1], groups[3]}) == 3  # no session: a conversation alone
    requests = RequestTable(np.arange(4), trace.arrival_s, trace.prompt_tokens, trace.output_tokens,
                            prefix=trace.prefix)
    records, _, _ = serve(requests)
    # the second turn of "a" finds the first turn's 28 tokens in 7 full blocks (of its prompt and output)
    assert records["cached_tokens"].tolist() == [0, 0, 28, 0]


def test_a_session_column_needs_the_lengths() -> None:
    with pytest.raises(ValueError, match="session column needs the prompt and output"):
        load_trace_table("x.csv", {"arrival": "t", "session": "conv"})


# ----- a run ------------------------------------------------------------------------------------------------------


def run_of(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "prefix", "model": "mixtral-8x7b", "hardware": "h200",
        "workload": {"arrival": {"kind": "poisson", "rate_per_s": 2.0},
                     "prompt_tokens": {"kind": "task", "name": "gsm8k"},
                     "output_tokens": {"kind": "task", "name": "gsm8k"}},
        "policies": [{"name": "topk"}],
        "simulation": {"seed": 1, "num_requests": 40, "routing_mode": "statistical"},
        "output": {"dir": "unused", "figures": False},
    }
    for key, value in changes.items():
        data[key] = {**data.get(key, {}), **value}
    return run_experiment(validate_experiment(data)).runs[0].summary


def test_a_task_s_few_shot_prefix_is_cached_and_shortens_prefill() -> None:
    on, off = run_of(), run_of(serving={"prefix_caching": False})
    # gsm8k: a 536-token 8-shot prefix (33 blocks of 16, 528 tokens) before a median question of 57 tokens
    assert off["prefix_hit_rate"] == 0 and off["prefill_tokens_saved"] == 0
    assert 0.8 < on["prefix_hit_rate"] < 0.95
    assert on["ttft_p50_ms"] < off["ttft_p50_ms"]


def test_prefix_caching_with_offloaded_experts_accounts_for_every_request_and_repeats() -> None:
    """Both features of issue 19 at once: cached prefixes shorten prefill while missed experts are fetched."""
    config = {
        "name": "both", "model": "mixtral-8x7b", "hardware": {"profile": "h100-sxm", "measured_tables": False},
        "workload": {"arrival": {"kind": "poisson", "rate_per_s": 4.0},
                     "prompt_tokens": {"kind": "task", "name": "mbpp"},
                     "output_tokens": {"kind": "task", "name": "mbpp"}},
        "serving": {"max_num_seqs": 32, "gpu_memory_utilization": 0.95},
        "offloading": {"resident_experts_per_layer": 5, "residency": "lru"},
        "policies": [{"name": "lynx"}],
        "simulation": {"seed": 4, "num_requests": 30},
        "output": {"figures": False},
    }
    runs = [run_experiment(validate_experiment(config)).runs[0] for _ in range(2)]
    requests, iterations = runs[0].requests, runs[0].iterations
    assert (requests["status"] == "finished").all()
    assert (requests["generated_tokens"] == requests["output_tokens"]).all()
    assert iterations["sampled_tokens"].sum() == requests["generated_tokens"].sum()
    assert requests["cached_tokens"].iloc[1:].gt(0).all() and iterations["experts_fetched"].sum() > 0
    pd.testing.assert_frame_equal(runs[0].requests, runs[1].requests)
    assert runs[0].summary["prefix_hit_rate"] == runs[1].summary["prefix_hit_rate"] > 0.5
    assert runs[0].summary["tpot_p50_ms"] == runs[1].summary["tpot_p50_ms"]
