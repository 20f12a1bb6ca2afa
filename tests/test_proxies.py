"""Quality proxies and per-layer expert activity, on hand-worked selections."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from lynxsim.datatypes import DROPPED, Selection
from lynxsim.policies import Lynx, TopK
from lynxsim.policies.activity import distinct_experts, expert_token_counts
from lynxsim.policies.proxies import quality_proxies

# Logits chosen as log-probabilities, so p = softmax(logits) is the table itself. B=2, E=3, k=2.
#   token 0: p = [0.5, 0.3, 0.2]  top-2 {0, 1}, mass 0.8, argmax 0
#   token 1: p = [0.1, 0.6, 0.3]  top-2 {1, 2}, mass 0.9, argmax 1
P = np.array([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
LOGITS = np.log(P)


def selection(ids: list[list[int]]) -> Selection:
    expert_ids = np.array(ids, dtype=np.int64)
    return Selection(expert_ids, np.where(expert_ids == DROPPED, 0.0, 0.5))


# Selection A: token 0 runs {0, 2}, token 1 runs {1} and drops its second slot.
#   retained_mass = mean(0.7 / 0.8, 0.6 / 0.9) = mean(0.875, 0.6667) = 0.77083
#   top1_kept = 2/2 (0 and 1 still run); assignments_changed = 2/4 ((0,1) and (1,2) lost); dropped = 1/4
SEL_A = selection([[0, 2], [1, DROPPED]])
# Selection B: token 0 runs {1, 2} (loses its argmax), token 1 runs its top-2 in another order.
#   retained_mass = mean(0.5 / 0.8, 0.9 / 0.9) = mean(0.625, 1) = 0.8125
#   top1_kept = 1/2; assignments_changed = 1/4 ((0,0) lost); dropped = 0
SEL_B = selection([[1, 2], [2, 1]])


def test_proxies_selection_a() -> None:
    proxies = quality_proxies(LOGITS, SEL_A, 2)
    assert proxies.retained_mass.shape == ()
    np.testing.assert_allclose(proxies.retained_mass, (0.875 + 0.6 / 0.9) / 2, rtol=1e-12)
    assert proxies.top1_kept == 1.0
    assert proxies.assignments_changed == 0.5
    assert proxies.assignments_dropped == 0.25


def test_proxies_selection_b() -> None:
    proxies = quality_proxies(LOGITS, SEL_B, 2)
    np.testing.assert_allclose(proxies.retained_mass, 0.8125, rtol=1e-12)
    assert proxies.top1_kept == 0.5
    assert proxies.assignments_changed == 0.25
    assert proxies.assignments_dropped == 0.0


def test_proxies_are_per_layer_for_stacked_input() -> None:
    stacked = Selection(np.stack([SEL_A.expert_ids, SEL_B.expert_ids]), np.stack([SEL_A.weights, SEL_B.weights]))
    proxies = quality_proxies(np.stack([LOGITS, LOGITS]), stacked, 2)
    assert all(p.shape == (2,) and p.dtype == np.float64 for p in proxies)
    np.testing.assert_allclose(proxies.retained_mass, [(0.875 + 0.6 / 0.9) / 2, 0.8125], rtol=1e-12)
    np.testing.assert_array_equal(proxies.top1_kept, [1.0, 0.5])
    np.testing.assert_array_equal(proxies.assignments_changed, [0.5, 0.25])
    np.testing.assert_array_equal(proxies.assignments_dropped, [0.25, 0.0])


def test_topk_scores_perfectly() -> None:
    proxies = quality_proxies(LOGITS, TopK().select(LOGITS, 2), 2)
    assert tuple(float(p) for p in proxies) == (1.0, 1.0, 0.0, 0.0)


def test_lynx_example_from_policy_tests() -> None:
    # test_policy_lynx.py example 1: only token 1 changes, from {0, 2} to {0, 1}; 1 of 8 assignments.
    logits = np.array(
        [[3.0, 2.5, 1.0, 0.0, 0.2], [3.0, 2.4, 2.6, 0.0, 0.0], [2.5, 3.0, 0.0, 1.0, 0.0], [0.0, 2.2, 1.0, 3.0, 0.0]]
    )
    proxies = quality_proxies(logits, Lynx(alpha=1, beta=2).select(logits, 2), 2)
    e = np.exp(logits[1])
    np.testing.assert_allclose(proxies.retained_mass, (3 + (e[0] + e[1]) / (e[0] + e[2])) / 4, rtol=1e-12)
    assert proxies.top1_kept == 1.0
    assert proxies.assignments_changed == 0.125
    assert proxies.assignments_dropped == 0.0


def test_proxies_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="at least one token"):
        quality_proxies(np.zeros((0, 3)), Selection(np.zeros((0, 2), np.int64), np.zeros((0, 2))), 2)
    with pytest.raises(ValueError, match="shape"):
        quality_proxies(LOGITS, selection([[0, 1]]), 2)
    with pytest.raises(ValueError, match="lie in"):
        quality_proxies(LOGITS, selection([[0, 3], [1, 2]]), 2)


@settings(max_examples=100, deadline=None)
@given(
    arrays(np.float64, st.tuples(st.integers(1, 3), st.integers(1, 6), st.integers(2, 8)), elements=st.floats(-6, 6)),
    st.data(),
)
def test_retained_mass_never_exceeds_one(logits: np.ndarray, data: st.DataObject) -> None:
    top_k = data.draw(st.integers(1, logits.shape[-1]))
    lynx = Lynx(alpha=data.draw(st.sampled_from([0.5, 1.0, 3.0])), beta=data.draw(st.sampled_from([1, 2, None])))
    proxies = quality_proxies(logits, lynx.select(logits, top_k), top_k)
    assert ((proxies.retained_mass > 0) & (proxies.retained_mass <= 1.0)).all()
    for value in proxies[1:]:
        assert ((value >= 0) & (value <= 1)).all()
    assert (proxies.assignments_dropped == 0).all()
    assert tuple(p.tolist() for p in quality_proxies(logits, TopK().select(logits, top_k), top_k)) == (
        [1.0] * logits.shape[0],
        [1.0] * logits.shape[0],
        [0.0] * logits.shape[0],
        [0.0] * logits.shape[0],
    )


# Activity: layer 0 ids [[0,2],[2,-1],[1,2]] -> expert 0: 1 token, 1: 1, 2: 3, 3: 0 -> 3 distinct.
#           layer 1 ids [[3,-1],[-1,-1],[3,0]] -> expert 0: 1, 3: 2 -> 2 distinct (DROPPED ignored).
IDS = np.array([[[0, 2], [2, DROPPED], [1, 2]], [[3, DROPPED], [DROPPED, DROPPED], [3, 0]]])


def test_expert_token_counts_per_layer() -> None:
    counts = expert_token_counts(IDS, 4)
    assert counts.dtype == np.int64
    np.testing.assert_array_equal(counts, [[1, 1, 3, 0], [1, 0, 0, 2]])
    np.testing.assert_array_equal(distinct_experts(IDS, 4), [3, 2])
    assert distinct_experts(IDS, 4).dtype == np.int64


def test_activity_of_one_layer_and_edge_cases() -> None:
    np.testing.assert_array_equal(expert_token_counts(IDS[0], 5), [1, 1, 3, 0, 0])
    assert distinct_experts(IDS[0], 5).shape == () and distinct_experts(IDS[0], 5) == 3
    np.testing.assert_array_equal(expert_token_counts(np.full((2, 3, 2), DROPPED), 4), np.zeros((2, 4)))
    np.testing.assert_array_equal(expert_token_counts(np.zeros((2, 0, 2), dtype=np.int64), 4), np.zeros((2, 4)))
    np.testing.assert_array_equal(expert_token_counts(IDS.astype(np.int32), 4), [[1, 1, 3, 0], [1, 0, 0, 2]])


def test_activity_rejects_bad_ids() -> None:
    with pytest.raises(ValueError, match="lie in"):
        expert_token_counts(IDS, 3)  # id 3 is not an expert of a 3-expert layer
    with pytest.raises(ValueError, match="lie in"):
        expert_token_counts(IDS - 1, 4)
    with pytest.raises(ValueError, match="integers"):
        expert_token_counts(IDS.astype(float), 4)


def test_activity_matches_selection_of_a_policy() -> None:
    logits = np.random.default_rng(0).standard_normal((4, 16, 8))
    sel = Lynx(alpha=3, beta=2).select(logits, 2)
    counts = expert_token_counts(sel.expert_ids, 8)
    np.testing.assert_array_equal(counts.sum(axis=-1), 16 * 2)
    for layer in range(4):
        np.testing.assert_array_equal(counts[layer], np.bincount(sel.expert_ids[layer].ravel(), minlength=8))


def test_of_topk_equals_scoring_topk_itself() -> None:
    from lynxsim.policies import make
    from lynxsim.policies.proxies import QualityProxies, quality_proxies

    logits = np.random.default_rng(0).normal(size=(3, 5, 8))
    scored = quality_proxies(logits, make("topk").select(logits, 2), 2)
    for got, want in zip(QualityProxies.of_topk(3), scored, strict=True):
        np.testing.assert_allclose(got, want)
