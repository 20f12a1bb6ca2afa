"""The statistical routing mode: tables built from a routing source and a policy, sampled per iteration.

Statistical checks use fixed seeds and bounds several standard errors wide, so they are deterministic, not flaky.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lynxsim.config import validate_experiment
from lynxsim.datatypes import BatchShape, ExpertActivity, Selection
from lynxsim.errors import InputError
from lynxsim.hardware import load_hardware
from lynxsim.models import load_catalog_model
from lynxsim.parallel import ParallelPlan, make_instance_cost_model
from lynxsim.policies import Policy, TopK, make
from lynxsim.policies.activity import distinct_experts
from lynxsim.policies.proxies import QualityProxies
from lynxsim.routing import SyntheticRouting
from lynxsim.routing.statistical import (
    ActivityTable,
    StatisticalRouting,
    UniformStream,
    build_activity_table,
    default_sizes,
)
from lynxsim.runner import run_experiment, statistical_sizes

LAYERS, EXPERTS, TOP_K = 4, 8, 2


class SameChoiceRouting:
    """Every token of every request has the same logits: layer ``l`` prefers experts ``l, l+1, ...`` (mod E), so
    a batch of any size activates exactly its top-k experts, each once per token."""

    num_moe_layers = LAYERS
    num_experts = EXPERTS

    def logits(self, request_ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        ranks = (np.arange(EXPERTS)[None, :] - np.arange(LAYERS)[:, None]) % EXPERTS
        row = -ranks.astype(np.float32)
        return np.broadcast_to(row[:, None, :], (LAYERS, len(request_ids), EXPERTS)).copy()


class NotTopK:
    """Top-k behind another type, so that a table takes the generic path (a batch per size) for it."""

    name = "topk-generic"

    def select(self, logits: np.ndarray, top_k: int, *, renormalize: bool = True) -> Selection:
        return TopK().select(logits, top_k, renormalize=renormalize)


def build(routing: object, policy: Policy, sizes: object, **kwargs: object) -> ActivityTable:
    options: dict[str, object] = {
        "top_k": TOP_K, "renormalize": True, "activity": ExpertActivity.of_counts, "samples": 8, "seed": 3,
        "num_experts": EXPERTS, **kwargs,
    }
    return build_activity_table(routing, policy, sizes=sizes, **options)  # type: ignore[arg-type]


def sample(table: ActivityTable, tokens: int, rng: np.random.Generator) -> tuple[ExpertActivity, QualityProxies]:
    """One iteration of ``tokens`` tokens drawn from ``table`` with a fresh pair of uniforms."""
    drawn = table.draw(tokens, rng.random((1, 2)))
    proxies = np.broadcast_to(drawn.proxies, (4, 1, table.num_layers))[:, 0]
    return drawn.activities[0], QualityProxies(*proxies)


def mixtral_routing() -> tuple[SyntheticRouting, int, int]:
    model = load_catalog_model("mixtral-8x7b")
    return SyntheticRouting(model.num_moe_layers, model.num_experts, None, seed=11), model.num_experts, model.top_k


@pytest.mark.parametrize("policy", [make("topk"), make("lynx", alpha=0.7, beta=1), NotTopK()], ids=lambda p: p.name)
def test_known_answer_of_a_router_whose_tokens_all_agree(policy: Policy) -> None:
    sizes = default_sizes(40)
    table = build(SameChoiceRouting(), policy, sizes)
    assert table.distinct.shape == (sizes.size, 8, LAYERS)
    assert (table.distinct == TOP_K).all()
    expected = np.broadcast_to(sizes[:, None, None] * TOP_K, table.distinct.shape)
    np.testing.assert_array_equal(table.assignments, expected)
    assert table.rank_distinct is None and table.rank_assignments is None
    rng = np.random.default_rng(0)
    for tokens in (1, 7, 17, 19, 33, 40):
        activity, proxies = sample(table, tokens, rng)
        assert (activity.distinct == TOP_K).all() and (activity.assignments == tokens * TOP_K).all()
        np.testing.assert_allclose(proxies.retained_mass, 1.0)
        np.testing.assert_allclose(proxies.assignments_changed, 0.0)
    assert (table.proxies is None) == isinstance(policy, TopK)


def test_default_grid() -> None:
    sizes = default_sizes(2048)
    assert list(sizes[:16]) == list(range(1, 17)) and sizes[-1] == 2048
    steps = sizes[16:] / sizes[15:-1]
    assert (np.diff(sizes) > 0).all() and steps.max() <= 1.13  # about 10% (rounded to whole tokens)
    assert sizes.size == 67
    assert list(default_sizes(5)) == [1, 2, 3, 4, 5]
    assert default_sizes(17)[-1] == 17
    with pytest.raises(ValueError, match="at least one token"):
        default_sizes(0)


def test_grid_of_a_decode_only_table_stops_at_the_sequence_limit() -> None:
    serving = validate_experiment(CONFIG).serving
    assert statistical_sizes(serving, with_prefill=True)[-1] == 256
    assert statistical_sizes(serving, with_prefill=False)[-1] == 16


def hand_table() -> ActivityTable:
    """Sizes 4 and 8; size 4 activates 1 expert per layer with 40 assignments, size 8 two with 80; 3 samples."""
    shape = (2, 3, LAYERS)
    distinct = np.stack([np.full(shape[1:], 1), np.full(shape[1:], 2)]).astype(np.int16)
    assignments = np.stack([np.full(shape[1:], 40), np.full(shape[1:], 80)]).astype(np.int32)
    rank_distinct = np.stack([distinct, np.zeros_like(distinct)], axis=-1)
    rank_assignments = np.stack([assignments - 10, np.full_like(assignments, 10)], axis=-1)
    return ActivityTable("hand", np.array([4, 8]), distinct, assignments, rank_distinct, rank_assignments, None, 0.0)


def test_between_grid_sizes_only_the_two_neighbours_with_linear_odds_and_rescaled_assignments() -> None:
    table = hand_table()
    rng = np.random.default_rng(5)
    draws = [sample(table, 5, rng)[0] for _ in range(4000)]
    picked_upper = np.array([int(a.distinct[0]) == 2 for a in draws])
    assert {int(a.distinct[0]) for a in draws} == {1, 2}
    assert abs(picked_upper.mean() - 0.25) < 0.03  # (5 - 4) / (8 - 4); binomial sd 0.007
    for activity in draws:
        assert (activity.assignments == 50).all()  # 40 * 5/4 and 80 * 5/8
        assert activity.rank_assignments is not None
        assert (activity.rank_assignments[:, 1] == round(10 * 5 / (4 if activity.distinct[0] == 1 else 8))).all()
    on_grid, _ = sample(table, 8, rng)
    assert (on_grid.distinct == 2).all() and (on_grid.assignments == 80).all()
    for outside in (0, 9):
        with pytest.raises(ValueError, match="covers 1 to 8 tokens"):
            sample(table, outside, rng)


def test_tables_are_read_only_and_draws_are_copies() -> None:
    table = hand_table()
    activity, _ = sample(table, 4, np.random.default_rng(0))
    activity.distinct[0] = 5
    assert (table.distinct == np.stack([np.full((3, LAYERS), 1), np.full((3, LAYERS), 2)])).all()
    with pytest.raises(ValueError, match="read-only"):
        table.assignments[0, 0, 0] = 1


def test_draws_of_several_iterations_are_the_draws_one_by_one() -> None:
    """A decode run draws its iterations in one call: the same as drawing them one at a time."""
    routing, experts, top_k = mixtral_routing()
    table = build(routing, make("lynx", alpha=0.7, beta=1), default_sizes(40), top_k=top_k, num_experts=experts)
    uniforms = np.random.default_rng(4).random((9, 2))
    for tokens in (16, 29):
        together = table.draw(tokens, uniforms)
        for k in range(9):
            alone = table.draw(tokens, uniforms[k : k + 1])
            np.testing.assert_array_equal(together.activities[k].assignments, alone.activities[0].assignments)
            np.testing.assert_array_equal(together.distinct[k], alone.distinct[0])
            np.testing.assert_array_equal(together.proxies[:, k], alone.proxies[:, 0])


def test_uniform_stream_hands_unused_draws_to_the_next_iteration() -> None:
    stream, reference = UniformStream(np.random.default_rng(3)), np.random.default_rng(3).random((2048, 2))
    np.testing.assert_array_equal(stream.peek(5), reference[:5])
    stream.advance(2)  # a run planned 5 iterations and simulated 2
    np.testing.assert_array_equal(stream.peek(1), reference[2:3])
    stream.advance(1)
    np.testing.assert_array_equal(stream.peek(1500), np.concatenate((reference[3:1024], np.random.default_rng(3)
                                                                       .random((1024 + 1500, 2))[1024:1503])))


def test_statistical_routing_picks_the_table_of_the_iteration() -> None:
    policy, baseline = hand_table(), build(SameChoiceRouting(), make("topk"), [4, 8])
    routing = StatisticalRouting(policy, baseline)
    uniforms = np.random.default_rng(0).random((1, 2))
    assert (routing.draw(8, True, uniforms).activities[0].assignments == 80).all()
    assert (routing.draw(8, False, uniforms).activities[0].assignments == 16).all()
    with pytest.raises(ValueError, match="no baseline table"):
        StatisticalRouting(policy, None).draw(8, False, uniforms)


def test_same_seed_same_samples_other_seed_other_samples() -> None:
    routing, experts, top_k = mixtral_routing()
    lynx = make("lynx", alpha=0.7, beta=1)
    kwargs = {"top_k": top_k, "num_experts": experts, "samples": 6}
    first = build(routing, lynx, [3, 16, 40], **kwargs)
    again = build(routing, lynx, [3, 16, 40], **kwargs)
    other = build(routing, lynx, [3, 16, 40], **{**kwargs, "seed": 4})
    for name in ("distinct", "assignments", "proxies"):
        np.testing.assert_array_equal(getattr(first, name), getattr(again, name))
    assert not np.array_equal(first.proxies, other.proxies)
    draws = [[sample(table, n, np.random.default_rng(9)) for n in (3, 11, 40)] for table in (first, again)]
    for (a, p), (b, q) in zip(*draws, strict=True):
        np.testing.assert_array_equal(a.distinct, b.distinct)
        np.testing.assert_array_equal(a.assignments, b.assignments)
        np.testing.assert_array_equal(p.retained_mass, q.retained_mass)


def test_top_k_shortcut_equals_routing_every_batch() -> None:
    routing, experts, top_k = mixtral_routing()
    kwargs = {"top_k": top_k, "num_experts": experts, "samples": 4}
    fast = build(routing, make("topk"), default_sizes(50), **kwargs)
    generic = build(routing, NotTopK(), default_sizes(50), **kwargs)
    np.testing.assert_array_equal(fast.distinct, generic.distinct)
    np.testing.assert_array_equal(fast.assignments, generic.assignments)


def test_a_small_logits_budget_routes_in_chunks_with_the_same_result() -> None:
    routing, experts, top_k = mixtral_routing()
    kwargs = {"top_k": top_k, "num_experts": experts, "samples": 5}
    whole = build(routing, make("lynx", alpha=0.7, beta=1), [2, 9], **kwargs)
    chunked = build(routing, make("lynx", alpha=0.7, beta=1), [2, 9], logits_chunk_bytes=1, **kwargs)
    np.testing.assert_array_equal(whole.distinct, chunked.distinct)
    np.testing.assert_array_equal(whole.proxies, chunked.proxies)


@pytest.mark.parametrize("policy", [make("topk"), make("lynx", alpha=0.7, beta=1)], ids=lambda p: p.name)
def test_sampled_distinct_experts_match_exact_routing_within_two_percent(policy: Policy) -> None:
    """Mean distinct experts per layer at decode batch 16 and 64, sampled from the default table (64 samples),
    against fresh batches routed exactly (other requests, other positions)."""
    routing, experts, top_k = mixtral_routing()
    table = build(routing, policy, default_sizes(64), top_k=top_k, num_experts=experts, samples=64)
    rng = np.random.default_rng(1)
    for batch in (16, 64):
        sampled = np.mean([sample(table, batch, rng)[0].distinct.mean() for _ in range(2000)])
        batches = 48
        request_ids = (3 << 40) + np.arange(batches * batch, dtype=np.int64)
        positions = rng.integers(0, 2048, size=batches * batch)
        logits = routing.logits(request_ids, positions).reshape(-1, batches, batch, experts)
        exact = np.mean([
            distinct_experts(policy.select(logits[:, b], top_k).expert_ids, experts).mean() for b in range(batches)
        ])
        assert abs(sampled / exact - 1.0) < 0.02, (policy.name, batch, sampled, exact)


def test_expert_parallel_tables_hold_per_rank_arrays_that_sum_to_the_layer() -> None:
    model = load_catalog_model("mixtral-8x7b")
    cost = make_instance_cost_model(model, load_hardware("h200"), "mixtral-8x7b", ParallelPlan(1, 2))
    routing, experts, top_k = mixtral_routing()
    table = build(routing, make("lynx", alpha=0.7, beta=1), default_sizes(24), top_k=top_k, num_experts=experts,
                  activity=cost.activity)
    assert table.rank_distinct is not None and table.rank_assignments is not None
    assert table.rank_distinct.shape == (*table.distinct.shape, 2)
    np.testing.assert_array_equal(table.rank_assignments.sum(axis=-1), table.assignments)
    np.testing.assert_array_equal(table.rank_distinct.sum(axis=-1), table.distinct)
    rng = np.random.default_rng(2)
    for tokens in (16, 17, 23):
        activity, _ = sample(table, tokens, rng)
        assert activity.rank_assignments is not None and activity.rank_distinct is not None
        assert activity.rank_assignments.shape == (model.num_moe_layers, 2)
        # Rescaled ranks are rounded one by one: their sum is the layer's up to half an assignment per rank.
        assert np.abs(activity.rank_assignments.sum(axis=-1) - activity.assignments).max() <= 1
        assert (activity.rank_assignments >= activity.rank_distinct).all()
        assert activity.rank_distinct.sum(axis=-1).tolist() == activity.distinct.tolist()
        latency = cost.iteration_activity(BatchShape(decode_context_tokens=np.full(tokens, 100)), activity)
        assert latency.moe_s > 0 and latency.communication_s > 0


class RecordingRouting(SameChoiceRouting):
    """Remembers the tokens it was asked for."""

    def __init__(self) -> None:
        self.calls: list[tuple[np.ndarray, np.ndarray]] = []

    def logits(self, request_ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        self.calls.append((request_ids.copy(), positions.copy()))
        return super().logits(request_ids, positions)


def test_a_batch_holds_a_decode_token_per_sequence_then_one_prefill_chunk() -> None:
    """Beyond ``max_sequences`` tokens (no iteration holds more sequences) a pool goes on with one request's
    consecutive positions; below it every token is its own request, and the decode-only table of the same seed
    sees the same tokens."""
    routing = RecordingRouting()
    build(routing, make("topk"), [3, 6, 10], samples=2, max_sequences=6)
    (request_ids, positions), = routing.calls
    for pool_ids, pool_positions in zip(request_ids.reshape(2, 10), positions.reshape(2, 10), strict=True):
        assert np.unique(pool_ids[:6]).size == 6 and (pool_ids[6:] == pool_ids[6]).all()
        assert pool_ids[6] not in pool_ids[:6]
        assert (np.diff(pool_positions[6:]) == 1).all()
    assert np.unique(request_ids).size == 2 * 7  # the two samples' pools share no request
    decode_only = RecordingRouting()
    build(decode_only, make("topk"), [3, 6], samples=2, max_sequences=6)
    (short_ids, short_positions), = decode_only.calls
    np.testing.assert_array_equal(short_ids.reshape(2, 6), request_ids.reshape(2, 10)[:, :6])
    np.testing.assert_array_equal(short_positions.reshape(2, 6), positions.reshape(2, 10)[:, :6])


def test_build_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="strictly increasing"):
        build(SameChoiceRouting(), make("topk"), [4, 4])
    with pytest.raises(ValueError, match="samples"):
        build(SameChoiceRouting(), make("topk"), [4], samples=0)
    with pytest.raises(ValueError, match="experts"):
        build(SameChoiceRouting(), make("topk"), [4], num_experts=16)
    with pytest.raises(ValueError, match="max_sequences"):
        build(SameChoiceRouting(), make("topk"), [4], max_sequences=0)


# ----- configuration and runs -----------------------------------------------------------------------------------

CONFIG: dict[str, object] = {
    "name": "statistical",
    "model": "mixtral-8x7b",
    "hardware": "h200",
    "workload": {
        "arrival": {"kind": "poisson", "rate_per_s": 6.0},
        "prompt_tokens": {"kind": "uniform", "low_tokens": 16, "high_tokens": 200},
        "output_tokens": {"kind": "uniform", "low_tokens": 4, "high_tokens": 40},
    },
    "serving": {"max_num_seqs": 16, "max_num_batched_tokens": 256},
    "policies": [{"name": "topk"}, {"name": "lynx"}],
    "simulation": {"seed": 3, "num_requests": 30, "routing_mode": "statistical", "statistical_samples": 8},
}


@pytest.mark.parametrize(
    ("simulation", "message"),
    [
        ({"routing_mode": "fast"}, "simulation.routing_mode: Input should be 'exact' or 'statistical'"),
        ({"routing_mode": "statistical", "statistical_samples": 0},
         "simulation.statistical_samples: Input should be greater than 0"),
        ({"routing_mode": "statistical", "statistical_samples": 2.5},
         "simulation.statistical_samples: Input should be a valid integer"),
    ],
)
def test_config_errors_name_the_key(simulation: dict[str, object], message: str) -> None:
    with pytest.raises(InputError) as info:
        validate_experiment({**CONFIG, "simulation": {"num_requests": 5, **simulation}})
    assert message in str(info.value)


def test_config_defaults() -> None:
    simulation = validate_experiment({**CONFIG, "simulation": {"num_requests": 5}}).simulation
    assert simulation.routing_mode == "exact" and simulation.statistical_samples == 64


def test_statistical_run_is_reproducible_and_reports_its_tables(tmp_path: Path) -> None:
    config = validate_experiment(CONFIG)
    first = run_experiment(config, tmp_path)
    second = run_experiment(config)
    for a, b in zip(first.runs, second.runs, strict=True):
        np.testing.assert_array_equal(a.iterations["latency_s"], b.iterations["latency_s"])
    topk, lynx = first.runs
    assert topk.summary["routing_table_build_s"] == topk.summary["routing_baseline_table_build_s"] > 0
    assert lynx.summary["routing_table_build_s"] > 0
    assert lynx.summary["routing_baseline_table_build_s"] == topk.summary["routing_baseline_table_build_s"]
    assert lynx.summary["mean_distinct_experts"] < topk.summary["mean_distinct_experts"]
    assert lynx.summary["retained_mass"] < 1.0 == topk.summary["retained_mass"]
    assert json.loads((tmp_path / "summary.json").read_text())["routing_mode"] == "statistical"
