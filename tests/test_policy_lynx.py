"""Lynx (AffinityBinning) on hand-worked batches, and the policy registry.

Each example works the rule of README.md ("Policies") through by hand in the comments:
q = max(ceil(alpha * (L - rowmax)), -beta), h = B ** q, score = column sums of h,
v = q + (score - h) / B, votes = top-k of v (ties: own logit, then lower id), kept = union of votes,
ids = each token's top-k logits inside kept. Batch sizes are powers of two, so every value is exact in float.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from lynxsim.datatypes import DROPPED, Selection
from lynxsim.policies import POLICY_NAMES, Lynx, TopK, make, policy_parameters
from lynxsim.policies.activity import distinct_experts

# Example 1: B=4 tokens, E=5 experts, k=2, alpha=1, beta=2; expert 2 is removed.
#   token 0: L=[3.0, 2.5, 1.0, 0.0, 0.2]  gap=[0,-0.5,-2,-3,-2.8]  q=[0, 0,-2,-2,-2]  top-2 {0,1}
#   token 1: L=[3.0, 2.4, 2.6, 0.0, 0.0]  gap=[0,-0.6,-0.4,-3,-3]  q=[0, 0, 0,-2,-2]  top-2 {0,2}
#   token 2: L=[2.5, 3.0, 0.0, 1.0, 0.0]  gap=[-0.5,0,-3,-2,-3]    q=[0, 0,-2,-2,-2]  top-2 {1,0}
#   token 3: L=[0.0, 2.2, 1.0, 3.0, 0.0]  gap=[-3,-0.8,-2,0,-3]    q=[-2,0,-2, 0,-2]  top-2 {3,1}
# h = 4**q (bin 0 -> 1, bin -2 -> 1/16):
#   score = [1+1+1+1/16, 1+1+1+1, 1/16+1+1/16+1/16, 1/16+1/16+1/16+1, 4/16] = [3.0625, 4, 1.1875, 1.1875, 0.25]
# v = q + (score - h) / 4:
#   token 0: [2.0625/4, 3/4, -2+1.125/4, -2+1.125/4, -2+0.1875/4] = [0.515625, 0.75, -1.71875, -1.71875, -1.953125]
#   token 1: [0.515625, 0.75, (1.1875-1)/4, -1.71875, -1.953125]    = [..., 0.046875, ...]  votes {1, 0}: drops 2
#   token 2: same as token 0                                        votes {1, 0}
#   token 3: [-2+3/4, 0.75, -1.71875, (1.1875-1)/4, -1.953125]      = [-1.25, 0.75, -1.71875, 0.046875, -1.953125]
# votes: {0,1}, {0,1}, {0,1}, {1,3}  ->  kept = {0, 1, 3}
# re-pick inside kept by logit: [0,1], [0,1] (2.6 is gone, 2.4 next), [1,0], [3,1]; 4 distinct experts -> 3.
EXAMPLE1 = np.array(
    [
        [3.0, 2.5, 1.0, 0.0, 0.2],
        [3.0, 2.4, 2.6, 0.0, 0.0],
        [2.5, 3.0, 0.0, 1.0, 0.0],
        [0.0, 2.2, 1.0, 3.0, 0.0],
    ]
)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_example1_vote_scores_match_hand_values() -> None:
    v = Lynx(alpha=1, beta=2).vote_scores(EXAMPLE1[None])[0]
    expected = [
        [0.515625, 0.75, -1.71875, -1.71875, -1.953125],
        [0.515625, 0.75, 0.046875, -1.71875, -1.953125],
        [0.515625, 0.75, -1.71875, -1.71875, -1.953125],
        [-1.25, 0.75, -1.71875, 0.046875, -1.953125],
    ]
    np.testing.assert_array_equal(v, expected)


def test_example1_removes_expert_2() -> None:
    sel = Lynx(alpha=1, beta=2).select(EXAMPLE1, 2)
    np.testing.assert_array_equal(sel.expert_ids, [[0, 1], [0, 1], [1, 0], [3, 1]])
    np.testing.assert_array_equal(TopK().select(EXAMPLE1, 2).expert_ids, [[0, 1], [0, 2], [1, 0], [3, 1]])
    assert distinct_experts(sel.expert_ids, 5) == 3
    assert distinct_experts(TopK().select(EXAMPLE1, 2).expert_ids, 5) == 4


def test_example1_weights() -> None:
    sel = Lynx(alpha=1, beta=2).select(EXAMPLE1, 2)
    # Renormalized: p over the chosen pair / its sum. Token 1 runs (0, 1): e^3 / (e^3 + e^2.4), e^2.4 / (...).
    p = softmax(EXAMPLE1)
    chosen = np.take_along_axis(p, sel.expert_ids, axis=-1)
    np.testing.assert_allclose(sel.weights, chosen / chosen.sum(axis=-1, keepdims=True), rtol=1e-12)
    np.testing.assert_allclose(sel.weights[1], [1 / (1 + math.exp(-0.6)), 1 / (1 + math.exp(0.6))], rtol=1e-12)


def test_example1_unrenormalized_weights_keep_original_topk_mass() -> None:
    # w = re-softmax over kept, top-2; scaled by (original top-2 mass) / sum(w). Tokens 0, 2, 3 keep their
    # top-2, so they get raw p. Token 1 trades expert 2 (L=2.6) for expert 1 (L=2.4):
    #   w = p[[0,1]] * (p0 + p2) / (p0 + p1)  -> the pair still carries the original mass p0 + p2.
    sel = Lynx(alpha=1, beta=2).select(EXAMPLE1, 2, renormalize=False)
    p = softmax(EXAMPLE1)
    for t in (0, 2, 3):
        np.testing.assert_allclose(sel.weights[t], p[t, sel.expert_ids[t]], rtol=1e-12)
    token1 = p[1, [0, 1]] * (p[1, 0] + p[1, 2]) / (p[1, 0] + p[1, 1])
    np.testing.assert_allclose(sel.weights[1], token1, rtol=1e-12)
    np.testing.assert_allclose(sel.weights[1].sum(), p[1, 0] + p[1, 2], rtol=1e-12)


# Example 2 (ties): B=2, E=4, k=1, alpha=1, beta=1.
#   token 0: L=[0.0, -0.5, -0.3, -2.0]  q=[0, 0, 0,-1]   top-1 {0}
#   token 1: L=[-2.0, 0.0, 0.0, -3.0]   q=[-1, 0, 0,-1]  top-1 {1} (tied with 2: lower id)
# h = 2**q: token 0 [1, 1, 1, 1/2], token 1 [1/2, 1, 1, 1/2]; score = [1.5, 2, 2, 1]
#   token 0: v = [(1.5-1)/2, (2-1)/2, (2-1)/2, -1+(1-.5)/2] = [0.25, 0.5, 0.5, -0.75]
#            experts 1 and 2 tie on v; token 0's own logit breaks it: -0.3 > -0.5 -> votes 2
#            (a plain lower-id rule would have voted 1)
#   token 1: v = [-1+(1.5-.5)/2, 0.5, 0.5, -1+(1-.5)/2] = [-0.5, 0.5, 0.5, -0.75]
#            experts 1 and 2 tie on v and on logit (0.0) -> lower id: votes 1
# kept = {1, 2}; token 0 re-picks 2 (-0.3 > -0.5), token 1 re-picks 1 (tie at 0.0, lower id).
EXAMPLE2 = np.array([[0.0, -0.5, -0.3, -2.0], [-2.0, 0.0, 0.0, -3.0]])


def test_example2_ties() -> None:
    lynx = Lynx(alpha=1, beta=1)
    v = lynx.vote_scores(EXAMPLE2[None])[0]
    np.testing.assert_array_equal(v, [[0.25, 0.5, 0.5, -0.75], [-0.5, 0.5, 0.5, -0.75]])
    sel = lynx.select(EXAMPLE2, 1)
    np.testing.assert_array_equal(sel.expert_ids, [[2], [1]])
    np.testing.assert_array_equal(sel.weights, [[1.0], [1.0]])
    np.testing.assert_array_equal(TopK().select(EXAMPLE2, 1).expert_ids, [[0], [1]])


# Example 3: one token equals top-k exactly. L=[0.0, -1.1, -1.0, 0.5, -1.0], k=3, alpha=1, beta=1:
#   gap=[-0.5, -1.6, -1.5, 0, -1.5] -> q=[0, -1, -1, 0, -1]; B=1, so v = q (no other tokens).
#   bin 0: experts 3 (0.5), 0 (0.0); bin -1: 2 (-1.0), 4 (-1.0), 1 (-1.1) -> third vote by logit then id: 2.
#   votes = kept = {3, 0, 2} = top-3. (Breaking v-ties by id alone would vote 1 and differ from top-k.)
EXAMPLE3 = np.array([[0.0, -1.1, -1.0, 0.5, -1.0]])


@pytest.mark.parametrize("renormalize", [True, False])
def test_example3_single_token_is_topk_exactly(renormalize: bool) -> None:
    sel = Lynx(alpha=1, beta=1).select(EXAMPLE3, 3, renormalize=renormalize)
    ref = TopK().select(EXAMPLE3, 3, renormalize=renormalize)
    np.testing.assert_array_equal(sel.expert_ids, [[3, 0, 2]])
    np.testing.assert_array_equal(sel.expert_ids, ref.expert_ids)
    np.testing.assert_array_equal(sel.weights, ref.weights)  # bit-identical, not just close


# Example 4: beta=None vs beta=1. B=2, E=3, k=1, alpha=1.
#   token 0: L=[0, -0.5, -5]  q=[0, 0, -5]   (beta=1: [0, 0, -1])
#   token 1: L=[-3, -2, 0]    q=[-3, -2, 0]  (beta=1: [-1, -1, 0])
# beta=None: h = 2**q: token 0 [1, 1, 1/32], token 1 [1/8, 1/4, 1]; score = [1.125, 1.25, 1.03125]
#   token 0: v = [(1.125-1)/2, (1.25-1)/2, -5+(1.03125-1/32)/2] = [0.0625, 0.125, -4.5] -> votes 1:
#            token 1 likes expert 1 (bin -2) more than expert 0 (bin -3), and only the unfloored bins see it.
#   token 1: v = [-3+1/2, -2+1/2, (1.03125-1)/2] = [-2.5, -1.5, 0.015625] -> votes 2
#   kept = {1, 2} -> ids [[1], [2]]; top-1 would be [[0], [2]].
# beta=1: both of token 1's dislikes share bin -1: h = [1,1,1/2] and [1/2,1/2,1]; score = [1.5, 1.5, 1.5]
#   token 0: v = [0.25, 0.25, -0.75] -> tie, own logit -> votes 0; token 1 votes 2 -> ids = top-1.
EXAMPLE4 = np.array([[0.0, -0.5, -5.0], [-3.0, -2.0, 0.0]])


def test_example4_no_floor() -> None:
    lynx = Lynx(alpha=1, beta=None)
    np.testing.assert_array_equal(lynx.vote_scores(EXAMPLE4[None])[0], [[0.0625, 0.125, -4.5], [-2.5, -1.5, 0.015625]])
    np.testing.assert_array_equal(lynx.select(EXAMPLE4, 1).expert_ids, [[1], [2]])
    np.testing.assert_array_equal(Lynx(alpha=1, beta=1).select(EXAMPLE4, 1).expert_ids, [[0], [2]])


def test_example4_unrenormalized_single_expert_carries_top1_mass() -> None:
    # k=1: w = [1] over the re-picked expert, scaled by the original top-1 mass: token 0 runs expert 1 with
    # weight p[0, 0], the probability of the expert it lost.
    sel = Lynx(alpha=1, beta=None).select(EXAMPLE4, 1, renormalize=False)
    p = softmax(EXAMPLE4)
    np.testing.assert_allclose(sel.weights[:, 0], [p[0, 0], p[1, 2]], rtol=1e-12)


# Example 5: Lynx can activate MORE distinct experts than top-k (so no test asserts the opposite).
# B=4, E=4 (a, b, c, d = 0..3), k=1, alpha=1, beta=None; no ties anywhere near a decision.
#   token 0: L=[-2, -0.5, 0, -1]     q=[-2, 0, 0, -1]   top-1 c
#   token 1: L=[0, -0.25, -3, -0.5]  q=[0, 0, -3, 0]    top-1 a
#   token 2: L=[-2.5, -2, 0, -1]     q=[-2, -2, 0, -1]  top-1 c
#   token 3: L=[0, -2, -3, -0.5]     q=[0, -2, -3, 0]   top-1 a        top-1 uses {a, c}: 2 experts
# h = 4**q; score = [1/16+1+1/16+1, 1+1+1/16+1/16, 1+1/64+1+1/64, 1/4+1+1/4+1] = [2.125, 2.125, 2.03125, 2.5]
#   token 0: v = [-2+2.0625/4, 1.125/4, 1.03125/4, -1+2.25/4] = [-1.484375, 0.28125, 0.2578125, -0.4375] -> b
#   token 1: v = [1.125/4, 1.125/4, -3+2.015625/4, 1.5/4]       = [0.28125, 0.28125, -2.49609375, 0.375] -> d
#   token 2: v = [-1.484375, -1.484375, 0.2578125, -0.4375]                                              -> c
#   token 3: v = [0.28125, -1.484375, -2.49609375, 0.375]                                                -> d
# d is the second choice of both a-tokens, so both vote d and a is gone; kept = {b, c, d}.
# Re-pick: token 0 -> c, token 1 -> b (-0.25 beats d's -0.5: it voted d but b was kept by token 0),
# token 2 -> c, token 3 -> d. Lynx uses {b, c, d}: 3 experts.
EXAMPLE5 = np.array(
    [[-2.0, -0.5, 0.0, -1.0], [0.0, -0.25, -3.0, -0.5], [-2.5, -2.0, 0.0, -1.0], [0.0, -2.0, -3.0, -0.5]]
)


def test_example5_lynx_can_activate_more_experts_than_topk() -> None:
    lynx = Lynx(alpha=1, beta=None)
    np.testing.assert_array_equal(
        lynx.vote_scores(EXAMPLE5[None])[0],
        [
            [-1.484375, 0.28125, 0.2578125, -0.4375],
            [0.28125, 0.28125, -2.49609375, 0.375],
            [-1.484375, -1.484375, 0.2578125, -0.4375],
            [0.28125, -1.484375, -2.49609375, 0.375],
        ],
    )
    sel = lynx.select(EXAMPLE5, 1)
    np.testing.assert_array_equal(sel.expert_ids[:, 0], [2, 1, 2, 3])
    np.testing.assert_array_equal(TopK().select(EXAMPLE5, 1).expert_ids[:, 0], [2, 0, 2, 0])
    assert distinct_experts(sel.expert_ids, 4) == 3 > distinct_experts(TopK().select(EXAMPLE5, 1).expert_ids, 4)


def test_stacked_layers_are_independent_batches() -> None:
    lynx = Lynx(alpha=1, beta=None)
    stacked = lynx.select(np.stack([EXAMPLE5, EXAMPLE5[::-1]]), 1)
    assert stacked.expert_ids.shape == (2, 4, 1)
    np.testing.assert_array_equal(stacked.expert_ids[0], lynx.select(EXAMPLE5, 1).expert_ids)
    np.testing.assert_array_equal(stacked.expert_ids[1], lynx.select(EXAMPLE5[::-1], 1).expert_ids)


def test_output_dtypes_and_empty_batch() -> None:
    sel = Lynx(alpha=3, beta=2).select(EXAMPLE1.astype(np.float32), 2)
    assert sel.expert_ids.dtype == np.int64 and sel.weights.dtype == np.float64
    empty = Lynx(alpha=3, beta=2).select(np.zeros((3, 0, 5)), 2)
    assert empty.expert_ids.shape == empty.weights.shape == (3, 0, 2)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"alpha": 0, "beta": 1}, "alpha"),
        ({"alpha": -1.0, "beta": 1}, "alpha"),
        ({"alpha": float("nan"), "beta": 1}, "alpha"),
        ({"alpha": float("inf"), "beta": 1}, "alpha"),
        ({"alpha": "3", "beta": 1}, "alpha"),
        ({"alpha": True, "beta": 1}, "alpha"),
        ({"alpha": 1, "beta": 0}, "beta"),
        ({"alpha": 1, "beta": -2}, "beta"),
        ({"alpha": 1, "beta": 1.5}, "beta"),
        ({"alpha": 1, "beta": True}, "beta"),
        ({"alpha": 1, "beta": "2"}, "beta"),
    ],
)
def test_constructor_rejects_bad_parameters(params: dict, message: str) -> None:
    with pytest.raises(ValueError, match=f"lynx parameter {message}"):
        Lynx(**params)


def test_constructor_normalizes_parameters() -> None:
    lynx = Lynx(alpha=3, beta=2.0)
    assert lynx.alpha == 3.0 and isinstance(lynx.alpha, float)
    assert lynx.beta == 2 and isinstance(lynx.beta, int)
    assert Lynx(alpha=0.7, beta=None).beta is None


@pytest.mark.parametrize("top_k", [0, 6, 1.0, True])
def test_select_rejects_bad_top_k(top_k: object) -> None:
    with pytest.raises(ValueError, match="top_k"):
        Lynx(alpha=1, beta=1).select(EXAMPLE1, top_k)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_select_rejects_non_finite_logits(bad: float) -> None:
    logits = EXAMPLE1.copy()
    logits[2, 3] = bad
    with pytest.raises(ValueError, match="finite"):
        Lynx(alpha=1, beta=1).select(logits, 2)


def test_select_rejects_bad_shape() -> None:
    with pytest.raises(ValueError, match="shape"):
        TopK().select(np.zeros(5), 1)


# The registry.


def test_registry_names_and_make() -> None:
    assert POLICY_NAMES == ("capacity", "lynx", "oea", "prune", "skip", "topk", "topp", "vote")
    assert isinstance(make("topk"), TopK)
    lynx = make("lynx", alpha=3, beta=2)
    assert lynx == Lynx(alpha=3, beta=2) and lynx.name == "lynx"
    assert policy_parameters("lynx") == ("alpha", "beta")
    assert policy_parameters("topk") == ()
    assert isinstance(make("topk").select(EXAMPLE1, 2), Selection)
    assert DROPPED == -1


def test_make_unknown_policy_names_known_ones() -> None:
    with pytest.raises(
        ValueError, match=r"unknown policy 'lynks'; known policies: capacity, lynx, oea, prune, skip, topk, topp, vote"
    ):
        make("lynks")


def test_make_unknown_parameter_names_policy_and_parameters() -> None:
    with pytest.raises(ValueError, match=r"policy 'lynx': unknown parameter\(s\) gamma; known parameters: alpha, beta"):
        make("lynx", alpha=1, beta=1, gamma=2)
    with pytest.raises(ValueError, match=r"policy 'topk': unknown parameter\(s\) alpha; known parameters: none"):
        make("topk", alpha=1)


def test_make_missing_parameter() -> None:
    with pytest.raises(ValueError, match=r"policy 'lynx': missing parameter\(s\) beta"):
        make("lynx", alpha=1)


def test_make_bad_value_is_value_error() -> None:
    with pytest.raises(ValueError, match="lynx parameter alpha"):
        make("lynx", alpha=-1, beta=1)
