"""The policies beside Lynx (oea, skip, topp, prune, capacity, vote), Lynx's per-layer parameters and the
calibration protocol, on hand-worked batches.

Most logits are log-probabilities, so p = softmax(logits) is the table written in the comments (up to
rounding: comparisons of weights use rtol=1e-12). Each example works the rule through by hand.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from lynxsim.datatypes import DROPPED as D
from lynxsim.policies import (
    OEA,
    Capacity,
    Lynx,
    Prune,
    Skip,
    TopK,
    TopP,
    Vote,
    calibrate_if_needed,
    make,
    needs_calibration,
    policy_parameters,
)
from lynxsim.policies.activity import distinct_experts
from lynxsim.policies.proxies import quality_proxies


def logp(rows: list[list[float]]) -> np.ndarray:
    return np.log(np.array(rows, dtype=np.float64))


def close(actual: np.ndarray, expected: list) -> None:
    np.testing.assert_allclose(actual, np.array(expected, dtype=np.float64), rtol=1e-12, atol=1e-15)


# ---------------------------------------------------------------------------------------------------------
# OEA. B=3, E=5, k=2, k0=1.
#   token 0: p = [0.5,  0.2, 0.15, 0.1,  0.05]  rank 0,1,2,3,4   top-1 0   top-2 {0, 1}
#   token 1: p = [0.1,  0.4, 0.3,  0.15, 0.05]  rank 1,2,3,0,4   top-1 1   top-2 {1, 2}
#   token 2: p = [0.05, 0.1, 0.25, 0.2,  0.4 ]  rank 4,2,3,1,0   top-1 4   top-2 {4, 2}
# union of top-1 = {0, 1, 4}. Each token keeps its top-1 and fills slot 2 with its best-ranked union member:
#   token 0: 1 (rank 2) is in the union            -> [0, 1]  (its top-2)
#   token 1: 2 (0.3) and 3 (0.15) are not, 0 is    -> [1, 0]
#   token 2: 2 and 3 are not, 1 (0.1) is           -> [4, 1]
# top-2 runs {0, 1, 2, 4} (4 experts), OEA {0, 1, 4} (3).
# Weights, renormalized: [.5/.7, .2/.7], [.4/.5, .1/.5], [.4/.5, .1/.5].
# Unrenormalized: rescaled to each token's top-2 mass (.7, .7, .65): token 1 [.4, .1] * .7/.5 = [.56, .14],
#   token 2 [.4, .1] * .65/.5 = [.52, .13]; token 0 keeps its raw p.
OEA_LOGITS = logp([[0.5, 0.2, 0.15, 0.1, 0.05], [0.1, 0.4, 0.3, 0.15, 0.05], [0.05, 0.1, 0.25, 0.2, 0.4]])


def test_oea_fills_from_the_union_of_top1() -> None:
    sel = OEA(k0=1).select(OEA_LOGITS, 2)
    np.testing.assert_array_equal(sel.expert_ids, [[0, 1], [1, 0], [4, 1]])
    close(sel.weights, [[0.5 / 0.7, 0.2 / 0.7], [0.8, 0.2], [0.8, 0.2]])
    assert distinct_experts(sel.expert_ids, 5) == 3
    assert distinct_experts(TopK().select(OEA_LOGITS, 2).expert_ids, 5) == 4


def test_oea_unrenormalized_weights_carry_the_topk_mass() -> None:
    sel = OEA(k0=1).select(OEA_LOGITS, 2, renormalize=False)
    close(sel.weights, [[0.5, 0.2], [0.56, 0.14], [0.52, 0.13]])


def test_oea_with_k0_equal_k_is_topk() -> None:
    for renormalize in (True, False):
        sel = OEA(k0=2).select(OEA_LOGITS, 2, renormalize=renormalize)
        ref = TopK().select(OEA_LOGITS, 2, renormalize=renormalize)
        np.testing.assert_array_equal(sel.expert_ids, ref.expert_ids)
        np.testing.assert_array_equal(sel.weights, ref.weights)


# k=3, k0=1 on tokens 0 and 1 only: union = {0, 1} has 2 < 3 experts, so the third slot is DROPPED:
#   token 0 -> [0, 1, D], token 1 -> [1, 0, D]. Alone, token 0's union is {0}: [0, D, D].
def test_oea_drops_slots_when_the_union_is_smaller_than_k() -> None:
    sel = OEA(k0=1).select(OEA_LOGITS[:2], 3)
    np.testing.assert_array_equal(sel.expert_ids, [[0, 1, D], [1, 0, D]])
    close(sel.weights, [[0.5 / 0.7, 0.2 / 0.7, 0], [0.8, 0.2, 0]])
    alone = OEA(k0=1).select(OEA_LOGITS[:1], 3, renormalize=False)
    np.testing.assert_array_equal(alone.expert_ids, [[0, D, D]])
    close(alone.weights, [[0.5 + 0.2 + 0.15, 0, 0]])  # the whole top-3 mass on the one expert


def test_oea_refuses_k0_above_top_k() -> None:
    with pytest.raises(ValueError, match="k0=3 exceeds top_k=2"):
        OEA(k0=3).select(OEA_LOGITS, 2)


# ---------------------------------------------------------------------------------------------------------
# Skip, beta = 0.5, k = 2. w1/w0 of each token's top-2:
#   token 0: p = [0.6, 0.25, 0.1, 0.05]  top-2 (0, 1)  w1/w0 = 0.4167 < 0.5  -> [0, D]
#   token 1: p = [0.3, 0.4,  0.2, 0.1 ]  top-2 (1, 0)  w1/w0 = 0.75         -> [1, 0]
#   token 2: p = [0.2, 0.2,  0.5, 0.1 ]  top-2 (2, 0)  (0 and 1 tie: lower id) w1/w0 = 0.4 -> [2, D]
# Renormalized: [1, 0], [4/7, 3/7], [1, 0]. Raw: [.6, 0], [.4, .3], [.5, 0].
SKIP_LOGITS = logp([[0.6, 0.25, 0.1, 0.05], [0.3, 0.4, 0.2, 0.1], [0.2, 0.2, 0.5, 0.1]])


def test_skip_drops_the_weak_second_expert() -> None:
    sel = Skip(beta=0.5).select(SKIP_LOGITS, 2)
    np.testing.assert_array_equal(sel.expert_ids, [[0, D], [1, 0], [2, D]])
    close(sel.weights, [[1, 0], [4 / 7, 3 / 7], [1, 0]])
    raw = Skip(beta=0.5).select(SKIP_LOGITS, 2, renormalize=False)
    close(raw.weights, [[0.6, 0], [0.4, 0.3], [0.5, 0]])
    # beta = 0 never skips; beta > 1 always does.
    np.testing.assert_array_equal(
        Skip(beta=0).select(SKIP_LOGITS, 2).expert_ids, TopK().select(SKIP_LOGITS, 2).expert_ids
    )
    np.testing.assert_array_equal(Skip(beta=1.5).select(SKIP_LOGITS, 2).expert_ids, [[0, D], [1, D], [2, D]])


def test_skip_is_strict_and_tests_every_slot_against_the_first() -> None:
    # The rule is w1 < beta * w0: a ratio exactly equal to beta keeps the expert.
    logits = np.array([[0.0, -0.75, -3.0]])
    ratio = float(np.exp(logits[0, 1] - logits[0, 0]))
    np.testing.assert_array_equal(Skip(beta=ratio).select(logits, 2).expert_ids, [[0, 1]])
    np.testing.assert_array_equal(Skip(beta=np.nextafter(ratio, 1)).select(logits, 2).expert_ids, [[0, D]])
    # k = 3, p = [0.5, 0.3, 0.2]: w1/w0 = 0.6 keeps, w2/w0 = 0.4 drops.
    np.testing.assert_array_equal(Skip(beta=0.5).select(logp([[0.5, 0.3, 0.2]]), 3).expert_ids, [[0, 1, D]])


# Calibration: 2 layers x 4 tokens, E = 3, rows p = [1, r, 0.01] (unnormalized; softmax keeps the ratio r).
#   layer 0: r = 0.2, 0.4, 0.6, 0.8 -> median 0.5;   layer 1: r = 0.1, 0.3, 0.9, 0.5 -> median (0.3+0.5)/2 = 0.4
# Then on the same logits: layer 0 skips r = 0.2, 0.4; layer 1 skips r = 0.1, 0.3.
CALIB = np.log(np.array([[[1, r, 0.01] for r in (0.2, 0.4, 0.6, 0.8)], [[1, r, 0.01] for r in (0.1, 0.3, 0.9, 0.5)]]))


def test_skip_calibrates_the_median_ratio_per_layer() -> None:
    policy = Skip()
    assert needs_calibration(policy)
    with pytest.raises(ValueError, match="needs calibration"):
        policy.select(CALIB, 2)
    calibrated = policy.calibrate(CALIB, 2)
    assert not needs_calibration(calibrated)
    assert isinstance(calibrated.beta, tuple) and len(calibrated.beta) == 2
    close(np.array(calibrated.beta), [0.5, 0.4])
    np.testing.assert_array_equal(calibrated.select(CALIB, 2).expert_ids[..., 1], [[D, D, 1, 1], [D, D, 1, 1]])
    assert calibrated == Skip(beta=list(calibrated.beta))
    # Explicit parameters are never overwritten.
    explicit = Skip(beta=0.3)
    assert explicit.calibrate(CALIB, 2) is explicit and calibrate_if_needed(explicit, CALIB, 2) is explicit


def test_skip_per_layer_beta_needs_matching_layers() -> None:
    policy = Skip(beta=[0.5, 0.4])
    with pytest.raises(ValueError, match=r"2 per-layer values.*\[layers, tokens, experts\] logits with 2 layers"):
        policy.select(CALIB[0], 2)
    with pytest.raises(ValueError, match="with 2 layers"):
        policy.select(np.concatenate([CALIB, CALIB]), 2)


# ---------------------------------------------------------------------------------------------------------
# TopP, p = 0.6, k = 3 (strict: keep up to and including the first expert where the cumulative mass > p).
#   token 0: p = [0.7, 0.2, 0.06, 0.04]   cum 0.7 > 0.6             -> [0, D, D]
#   token 1: p = [0.3, 0.35, 0.2, 0.15]   order 1, 0: cum .35, .65  -> [1, 0, D]
#   token 2: p = [.25, .25, .25, .25]     order 0, 1, 2: cum .25, .5 -> [0, 1, 2] (top-3 mass .75 never > .6 early)
TOPP_LOGITS = logp([[0.7, 0.2, 0.06, 0.04], [0.3, 0.35, 0.2, 0.15], [0.25, 0.25, 0.25, 0.25]])


def test_topp_keeps_the_shortest_prefix_above_p() -> None:
    sel = TopP(p=0.6).select(TOPP_LOGITS, 3)
    np.testing.assert_array_equal(sel.expert_ids, [[0, D, D], [1, 0, D], [0, 1, 2]])
    close(sel.weights, [[1, 0, 0], [0.35 / 0.65, 0.3 / 0.65, 0], [1 / 3, 1 / 3, 1 / 3]])
    raw = TopP(p=0.6).select(TOPP_LOGITS, 3, renormalize=False)
    close(raw.weights, [[0.7, 0, 0], [0.35, 0.3, 0], [0.25, 0.25, 0.25]])
    # p = 1 keeps the whole top-k (its mass is below 1 here).
    np.testing.assert_array_equal(
        TopP(p=1.0).select(TOPP_LOGITS, 3).expert_ids, TopK().select(TOPP_LOGITS, 3).expert_ids
    )


def test_topp_threshold_is_strict() -> None:
    # Equal logits give p = 0.25 exactly; with p = 0.5 the mass after two experts is exactly 0.5, not above it,
    # so the third expert is still needed: [0, 1, 2]. (A ">=" rule would stop at two.)
    np.testing.assert_array_equal(TopP(p=0.5).select(np.zeros((1, 4)), 3).expert_ids, [[0, 1, 2]])


# ---------------------------------------------------------------------------------------------------------
# Prune, explicit kept experts {1, 2, 3} of E = 5, k = 2.
#   token 0: p = [0.5, 0.2, 0.15, 0.1, 0.05] -> inside {1,2,3}: [1, 2]   top-2 mass 0.7, chosen 0.35
#   token 1: p = [0.05, 0.1, 0.15, 0.3, 0.4] -> inside {1,2,3}: [3, 2]   top-2 mass 0.7, chosen 0.45
# Renormalized: [.2/.35, .15/.35], [.3/.45, .15/.45]. Raw rescaled to the top-2 mass: token 0 [.4, .3],
#   token 1 [.3, .15] * .7/.45.
PRUNE_LOGITS = logp([[0.5, 0.2, 0.15, 0.1, 0.05], [0.05, 0.1, 0.15, 0.3, 0.4]])


def test_prune_routes_inside_the_kept_experts() -> None:
    policy = Prune(kept_experts=[3, 1, 2])
    assert policy.kept_experts == (1, 2, 3) and not needs_calibration(policy)
    sel = policy.select(PRUNE_LOGITS, 2)
    np.testing.assert_array_equal(sel.expert_ids, [[1, 2], [3, 2]])
    close(sel.weights, [[0.2 / 0.35, 0.15 / 0.35], [0.3 / 0.45, 0.15 / 0.45]])
    raw = policy.select(PRUNE_LOGITS, 2, renormalize=False)
    close(raw.weights, [[0.4, 0.3], [0.3 * 0.7 / 0.45, 0.15 * 0.7 / 0.45]])
    # Fewer kept experts than k: the token runs them all and drops the rest.
    np.testing.assert_array_equal(Prune(kept_experts=[4]).select(PRUNE_LOGITS, 2).expert_ids, [[4, D], [4, D]])
    with pytest.raises(ValueError, match="kept expert id 5 is not an expert of a 5-expert layer"):
        Prune(kept_experts=[5]).select(PRUNE_LOGITS, 2)


# Calibration, 1 layer, 4 tokens, E = 4, k = 1, keep = 2:
#   token 0: p = [0.7, 0.1, 0.1, 0.1] -> 0      token 1: p = [0.6, 0.1, 0.2, 0.1] -> 0
#   token 2: p = [0.1, 0.5, 0.3, 0.1] -> 1      token 3: p = [0.1, 0.1, 0.6, 0.2] -> 2
# counts = [2, 1, 1, 0]: expert 0, then 1 and 2 tie on one vote each; summed p: expert 1 0.8 < expert 2 1.2
# -> kept {0, 2}. Routing token 2 inside {0, 2} then gives expert 2 (0.3 > 0.1).
PRUNE_CALIB = logp([[[0.7, 0.1, 0.1, 0.1], [0.6, 0.1, 0.2, 0.1], [0.1, 0.5, 0.3, 0.1], [0.1, 0.1, 0.6, 0.2]]])


def test_prune_calibrates_the_most_used_experts() -> None:
    policy = Prune(keep=2)
    assert needs_calibration(policy)
    with pytest.raises(ValueError, match="needs calibration"):
        policy.select(PRUNE_CALIB, 1)
    calibrated = calibrate_if_needed(policy, PRUNE_CALIB, 1)
    assert calibrated == Prune(keep=2, kept_experts=[[0, 2]])
    np.testing.assert_array_equal(calibrated.select(PRUNE_CALIB, 1).expert_ids[0, :, 0], [0, 0, 2, 2])
    # Per-layer lists need the stacked input with that many layers.
    with pytest.raises(ValueError, match="kept_experts has 1 per-layer values"):
        calibrated.select(PRUNE_CALIB[0], 1)
    # keep = experts keeps them all; more is refused.
    assert Prune(keep=4).calibrate(PRUNE_CALIB, 1) == Prune(keep=4, kept_experts=[[0, 1, 2, 3]])
    with pytest.raises(ValueError, match="at most the model's 4 experts, got 9"):  # a typo, not plain top-k
        Prune(keep=9).calibrate(PRUNE_CALIB, 1)


# ---------------------------------------------------------------------------------------------------------
# Capacity. B = 4, E = 4, k = 2, cf = 1: capacity = ceil(1 * 4 * 2 / 4) = 2 assignments per expert.
#   token 0: p = [0.5, 0.3, 0.1, 0.1]     top-2 (0, 1)
#   token 1: p = [0.4, 0.35, 0.15, 0.1]   top-2 (0, 1)
#   token 2: p = [0.45, 0.1, 0.4, 0.05]   top-2 (0, 2)
#   token 3: p = [0.1, 0.2, 0.3, 0.4]     top-2 (3, 2)
# expert 0: claims .5 (t0), .45 (t2), .4 (t1) -> t1's first choice is dropped.
# expert 1: .3 (t0), .35 (t1) -> both fit; expert 2: .4 (t2), .3 (t3); expert 3: .4 (t3).
# -> [0, 1], [1, D] (kept slots first), [0, 2], [3, 2]. Token 1 weights: renormalized [1, 0], raw [.35, 0].
CAP_LOGITS = logp([[0.5, 0.3, 0.1, 0.1], [0.4, 0.35, 0.15, 0.1], [0.45, 0.1, 0.4, 0.05], [0.1, 0.2, 0.3, 0.4]])


def test_capacity_drops_the_weakest_claims_on_a_full_expert() -> None:
    policy = Capacity(capacity_factor=1.0)
    assert policy.capacity(4, 2, 4) == 2
    sel = policy.select(CAP_LOGITS, 2)
    np.testing.assert_array_equal(sel.expert_ids, [[0, 1], [1, D], [0, 2], [3, 2]])
    close(sel.weights[1], [1, 0])
    close(policy.select(CAP_LOGITS, 2, renormalize=False).weights[1], [0.35, 0])
    # cf = E / k gives capacity = B: nothing is dropped.
    np.testing.assert_array_equal(
        Capacity(2.0).select(CAP_LOGITS, 2).expert_ids, TopK().select(CAP_LOGITS, 2).expert_ids
    )


# k = 1, cf = 1, B = 4, E = 4: capacity 1. Tokens 0 and 1 both want expert 0 with p = .6 and .7: token 1 keeps
# it and token 0 loses its only assignment (all slots DROPPED, weight 0). Two identical tokens tie exactly:
# the lower token index keeps the place.
def test_capacity_can_drop_a_token_entirely_and_ties_go_to_the_lower_token() -> None:
    logits = logp([[0.6, 0.2, 0.1, 0.1], [0.7, 0.1, 0.1, 0.1], [0.1, 0.5, 0.2, 0.2], [0.1, 0.1, 0.1, 0.7]])
    sel = Capacity(1.0).select(logits, 1)
    np.testing.assert_array_equal(sel.expert_ids[:, 0], [D, 0, 1, 3])
    np.testing.assert_array_equal(sel.weights[:, 0], [0, 1, 1, 1])
    proxies = quality_proxies(logits, sel, 1)
    assert proxies.assignments_dropped == 0.25 and proxies.top1_kept == 0.75
    twins = logp([[0.6, 0.4], [0.6, 0.4]])
    np.testing.assert_array_equal(Capacity(1.0).select(twins, 1).expert_ids[:, 0], [0, D])


def test_capacity_rounding() -> None:
    assert 1.1 * 50 * 8 / 8 > 55  # float error ...
    assert Capacity(1.1).capacity(50, 8, 8) == 55  # ... rounded away before the ceiling
    assert Capacity(1.25).capacity(64, 2, 8) == 20
    assert Capacity(1e-9).capacity(4, 1, 8) == 1  # at least one
    assert Capacity(1.1).capacity(64, 2, 8) == 18  # 17.6 -> 18


# ---------------------------------------------------------------------------------------------------------
# Vote. B = 4, E = 5, k = 2.
#   token 0: p = [0.4,  0.3, 0.15, 0.1,  0.05]  top-2 {0, 1}
#   token 1: p = [0.35, 0.1, 0.3,  0.2,  0.05]  top-2 {0, 2}
#   token 2: p = [0.3,  0.4, 0.1,  0.15, 0.05]  top-2 {1, 0}
#   token 3: p = [0.05, 0.1, 0.45, 0.35, 0.05]  top-2 {2, 3}
# votes = [3, 2, 2, 1, 0]; summed p = [1.1, 0.9, 1.0, 0.8, 0.2].
# budget 2: expert 0 (3 votes), then 1 vs 2 tie on 2 votes -> summed p 1.0 > 0.9 -> kept {0, 2}:
#   ids [0, 2], [0, 2], [0, 2], [2, 0]; token 2 weights [.3/.4, .1/.4], raw rescaled [.3, .1] * .7/.4.
# budget 3: kept {0, 1, 2}: [0, 1], [0, 2], [1, 0], [2, 1].   budget 1: kept {0}: [0, D] for every token.
# budget 4 covers every voted expert: top-k exactly (expert 4, with no vote, is never added by budget 5).
VOTE_LOGITS = logp(
    [
        [0.4, 0.3, 0.15, 0.1, 0.05],
        [0.35, 0.1, 0.3, 0.2, 0.05],
        [0.3, 0.4, 0.1, 0.15, 0.05],
        [0.05, 0.1, 0.45, 0.35, 0.05],
    ]
)


def test_vote_keeps_the_most_voted_experts() -> None:
    sel = Vote(budget=2).select(VOTE_LOGITS, 2)
    np.testing.assert_array_equal(sel.expert_ids, [[0, 2], [0, 2], [0, 2], [2, 0]])
    close(sel.weights[2], [0.75, 0.25])
    close(Vote(budget=2).select(VOTE_LOGITS, 2, renormalize=False).weights[2], [0.3 * 0.7 / 0.4, 0.1 * 0.7 / 0.4])
    np.testing.assert_array_equal(Vote(budget=3).select(VOTE_LOGITS, 2).expert_ids, [[0, 1], [0, 2], [1, 0], [2, 1]])
    np.testing.assert_array_equal(Vote(budget=1).select(VOTE_LOGITS, 2).expert_ids, [[0, D]] * 4)
    for budget in (4, 5, 50):
        np.testing.assert_array_equal(
            Vote(budget=budget).select(VOTE_LOGITS, 2).expert_ids, TopK().select(VOTE_LOGITS, 2).expert_ids
        )
    assert distinct_experts(sel.expert_ids, 5) == 2


# ---------------------------------------------------------------------------------------------------------
# Lynx with per-layer (alpha, beta): each layer equals the scalar policy with that layer's constants.
LYNX_LAYERS = np.random.default_rng(7).normal(size=(3, 6, 8)) * 2


def test_lynx_per_layer_parameters_equal_scalar_ones_layer_by_layer() -> None:
    alphas, betas = [0.7, 1.0, 3.0], [1, None, 2]
    stacked = Lynx(alpha=alphas, beta=betas).select(LYNX_LAYERS, 2)
    for layer in range(3):
        single = Lynx(alpha=alphas[layer], beta=betas[layer]).select(LYNX_LAYERS[layer], 2)
        np.testing.assert_array_equal(stacked.expert_ids[layer], single.expert_ids)
        np.testing.assert_array_equal(stacked.weights[layer], single.weights)
    # A list for one parameter and a scalar for the other.
    mixed = Lynx(alpha=1.0, beta=betas).select(LYNX_LAYERS, 2)
    for layer in range(3):
        single = Lynx(alpha=1.0, beta=betas[layer]).select(LYNX_LAYERS[layer], 2)
        np.testing.assert_array_equal(mixed.expert_ids[layer], single.expert_ids)
    assert Lynx(alpha=alphas, beta=2).alpha == (0.7, 1.0, 3.0)


def test_lynx_per_layer_parameters_check_the_layer_count() -> None:
    with pytest.raises(ValueError, match=r"policy 'lynx': alpha/beta has 3 per-layer values"):
        Lynx(alpha=[1, 2, 3], beta=1).select(LYNX_LAYERS[:2], 2)
    with pytest.raises(ValueError, match="with 3 layers; got logits of shape \\(6, 8\\)"):
        Lynx(alpha=1, beta=[1, 1, 1]).select(LYNX_LAYERS[0], 2)
    with pytest.raises(ValueError, match=r"disagree on the number of MoE layers: \[2, 3\]"):
        Lynx(alpha=[1, 2], beta=[1, 1, 1])
    with pytest.raises(ValueError, match="lynx parameter beta must be a positive integer"):
        Lynx(alpha=1, beta=[1, 1.5])
    with pytest.raises(ValueError, match="lynx parameter alpha must be a finite number > 0"):
        Lynx(alpha=[1, -1], beta=1)
    with pytest.raises(ValueError, match="lynx parameter alpha must be a scalar or a non-empty list"):
        Lynx(alpha=[], beta=1)


# ---------------------------------------------------------------------------------------------------------
# The registry, parameters and calibration protocol.


def test_registry_parameters() -> None:
    assert policy_parameters("oea") == ("k0",)
    assert policy_parameters("skip") == ("beta",)
    assert policy_parameters("topp") == ("p",)
    assert policy_parameters("prune") == ("keep", "kept_experts")
    assert policy_parameters("capacity") == ("capacity_factor",)
    assert policy_parameters("vote") == ("budget",)
    assert make("oea") == OEA(k0=1)
    assert make("topp") == TopP(p=0.4)
    assert make("capacity") == Capacity(capacity_factor=1.0)
    assert make("skip") == Skip(beta=None) and needs_calibration(make("skip"))
    with pytest.raises(ValueError, match=r"policy 'vote': missing parameter\(s\) budget"):
        make("vote")
    with pytest.raises(ValueError, match="needs keep"):
        make("prune")


def test_policies_without_calibration() -> None:
    for policy in (TopK(), Lynx(alpha=1, beta=1), OEA(), TopP(), Capacity(), Vote(budget=2), Skip(beta=[0.1, 0.2])):
        assert not needs_calibration(policy)
        assert calibrate_if_needed(policy, CALIB, 2) is policy


def test_calibration_input_is_checked() -> None:
    with pytest.raises(ValueError, match=r"calibration logits must be \[layers, tokens, experts\]"):
        Skip().calibrate(CALIB[0], 2)
    with pytest.raises(ValueError, match="at least one token"):
        Prune(keep=1).calibrate(np.zeros((2, 0, 3)), 2)
    with pytest.raises(ValueError, match="finite"):
        Skip().calibrate(np.full((1, 2, 3), np.nan), 2)
    with pytest.raises(ValueError, match="at least two experts"):
        Skip().calibrate(np.zeros((1, 2, 1)), 1)


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("oea", {"k0": 0}, "oea parameter k0 must be an integer >= 1"),
        ("oea", {"k0": 1.5}, "oea parameter k0"),
        ("oea", {"k0": True}, "oea parameter k0"),
        ("skip", {"beta": -0.1}, "skip parameter beta must be a finite number in"),
        ("skip", {"beta": float("nan")}, "skip parameter beta"),
        ("skip", {"beta": [0.5, "x"]}, "skip parameter beta"),
        ("topp", {"p": 0}, r"topp parameter p must be a finite number in \(0, 1\]"),
        ("topp", {"p": 1.01}, "topp parameter p"),
        ("prune", {"keep": 0}, "prune parameter keep"),
        ("prune", {"kept_experts": []}, "prune parameter kept_experts"),
        ("prune", {"kept_experts": [1, 1]}, "prune parameter kept_experts must be lists of distinct expert ids"),
        ("prune", {"kept_experts": [-1]}, "prune parameter kept_experts"),
        ("prune", {"kept_experts": [[0, 1], [2]], "keep": 2}, "exactly keep=2"),
        ("capacity", {"capacity_factor": 0}, "capacity parameter capacity_factor"),
        ("capacity", {"capacity_factor": math.inf}, "capacity parameter capacity_factor"),
        ("vote", {"budget": 0}, "vote parameter budget"),
        ("vote", {"budget": "3"}, "vote parameter budget"),
    ],
)
def test_bad_parameters(name: str, params: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make(name, **params)


@pytest.mark.parametrize(
    "policy",
    [OEA(), Skip(beta=0.5), TopP(), Prune(kept_experts=[0, 1]), Capacity(), Vote(budget=2)],
    ids=lambda p: p.name,
)
def test_dtypes_and_empty_batch(policy: object) -> None:
    sel = policy.select(VOTE_LOGITS.astype(np.float32), 2)  # type: ignore[attr-defined]
    assert sel.expert_ids.dtype == np.int64 and sel.weights.dtype == np.float64
    empty = policy.select(np.zeros((3, 0, 5)), 2)  # type: ignore[attr-defined]
    assert empty.expert_ids.shape == empty.weights.shape == (3, 0, 2)


def test_proxies_count_only_used_ids() -> None:
    # Skip example: token 0 keeps p = .6 of its top-2 .85; token 1 keeps all; token 2 keeps .5 of .7.
    sel = Skip(beta=0.5).select(SKIP_LOGITS, 2)
    proxies = quality_proxies(SKIP_LOGITS, sel, 2)
    close(proxies.retained_mass, (0.6 / 0.85 + 1 + 0.5 / 0.7) / 3)
    assert proxies.top1_kept == 1.0
    assert proxies.assignments_changed == pytest.approx(2 / 6)
    assert proxies.assignments_dropped == pytest.approx(2 / 6)


def test_check_policy_catches_select_errors_before_a_simulation() -> None:
    from lynxsim.policies import check_policy

    check_policy(Lynx(alpha=[1.0] * 4, beta=1), num_layers=4, num_experts=8, top_k=2)
    check_policy(OEA(k0=2), num_layers=4, num_experts=8, top_k=2)
    for policy, message in [
        (Lynx(alpha=[1.0] * 3, beta=1), "3 per-layer values"),
        (OEA(k0=3), "k0=3 exceeds top_k=2"),
        (Prune(kept_experts=[0, 8]), "kept expert id 8"),
        (Skip(), "needs calibration"),
        (Prune(keep=2), "needs calibration"),
    ]:
        with pytest.raises(ValueError, match=message):
            check_policy(policy, num_layers=4, num_experts=8, top_k=2)
