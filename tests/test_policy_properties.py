"""Property tests for TopK and Lynx on small random batches.

Logits come either from a coarse grid (many exact ties, so the tie rules are exercised) or from continuous
floats. Lynx is checked against a loop-per-token reference that evaluates the rule of DESIGN.md in exact
rational arithmetic, which pins down both the rule and the tie-breaking.

Not asserted, because it is false: "Lynx activates no more distinct experts than top-k". Voting by popularity
can move a token off its top-k onto an expert no token had in its top-k; test_policy_lynx.py, example 5, is
a worked counterexample. What holds is the bound by the kept set (at most B*k and E).
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from lynxsim.policies import Lynx, TopK
from lynxsim.policies.activity import distinct_experts

SETTINGS = settings(max_examples=100, deadline=None)


@st.composite
def batches(draw: st.DrawFn, max_layers: int = 3, max_tokens: int = 6) -> tuple[np.ndarray, int]:
    """Logits ``[layers, tokens, experts]`` and a valid top_k."""
    layers = draw(st.integers(1, max_layers))
    tokens = draw(st.integers(1, max_tokens))
    experts = draw(st.integers(2, 8))
    top_k = draw(st.integers(1, experts))
    if draw(st.booleans()):
        elements = st.integers(-6, 2).map(lambda i: i * 0.5)
    else:
        elements = st.floats(-6, 6, allow_nan=False, allow_infinity=False)
    return draw(arrays(np.float64, (layers, tokens, experts), elements=elements)), top_k


lynx_policies = st.builds(
    Lynx,
    alpha=st.one_of(st.sampled_from([0.5, 0.7, 1.0, 2.0, 3.0]), st.floats(0.1, 4.0)),
    beta=st.sampled_from([1, 2, 3, 4, None]),
)
policies = st.one_of(st.just(TopK()), lynx_policies)


def lynx_reference(logits: np.ndarray, top_k: int, alpha: float, beta: int | None) -> tuple[np.ndarray, set[int], int]:
    """One layer's Lynx ids (ordered by logit, ties by id), the kept set and the deepest bin, in exact arithmetic."""
    rows = logits.tolist()
    tokens, experts = len(rows), len(rows[0])
    q = []
    for row in rows:
        top = max(row)
        bins = [math.ceil((value - top) * alpha) for value in row]  # same float ops as the vectorized code
        q.append([max(b, -beta) for b in bins] if beta is not None else bins)
    h = [[Fraction(tokens) ** b for b in bins] for bins in q]
    score = [sum(h[t][e] for t in range(tokens)) for e in range(experts)]
    kept: set[int] = set()
    for t in range(tokens):
        v = [q[t][e] + (score[e] - h[t][e]) / tokens for e in range(experts)]
        kept.update(sorted(range(experts), key=lambda e: (-v[e], -rows[t][e], e))[:top_k])
    ids = [sorted(kept, key=lambda e: (-rows[t][e], e))[:top_k] for t in range(tokens)]
    return np.array(ids, dtype=np.int64), kept, -min(min(bins) for bins in q)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@SETTINGS
@given(batches(), policies, st.booleans())
def test_selection_contract(batch: tuple[np.ndarray, int], policy: TopK | Lynx, renormalize: bool) -> None:
    logits, top_k = batch
    sel = policy.select(logits, top_k, renormalize=renormalize)
    assert sel.expert_ids.shape == sel.weights.shape == (*logits.shape[:-1], top_k)
    assert sel.expert_ids.dtype == np.int64 and sel.weights.dtype == np.float64
    assert ((sel.expert_ids >= 0) & (sel.expert_ids < logits.shape[-1])).all()
    assert (np.diff(np.sort(sel.expert_ids, axis=-1), axis=-1) > 0).all()  # k distinct ids per token
    assert (sel.weights > 0).all()
    if renormalize:
        np.testing.assert_allclose(sel.weights.sum(axis=-1), 1.0, rtol=1e-12)
    else:
        assert (sel.weights.sum(axis=-1) <= 1.0 + 1e-12).all()
    # First slot is the strongest: ids ordered by logit, descending.
    chosen = np.take_along_axis(logits, sel.expert_ids, axis=-1)
    assert (np.diff(chosen, axis=-1) <= 0).all()


@SETTINGS
@given(batches(), policies, st.booleans())
def test_deterministic_and_stacked_equals_per_layer(
    batch: tuple[np.ndarray, int], policy: TopK | Lynx, renormalize: bool
) -> None:
    logits, top_k = batch
    stacked = policy.select(logits, top_k, renormalize=renormalize)
    again = policy.select(logits.copy(), top_k, renormalize=renormalize)
    np.testing.assert_array_equal(stacked.expert_ids, again.expert_ids)
    np.testing.assert_array_equal(stacked.weights, again.weights)
    for layer in range(logits.shape[0]):
        single = policy.select(logits[layer], top_k, renormalize=renormalize)
        np.testing.assert_array_equal(stacked.expert_ids[layer], single.expert_ids)
        np.testing.assert_array_equal(stacked.weights[layer], single.weights)


@SETTINGS
@given(batches(), st.booleans())
def test_topk_is_stable_argsort(batch: tuple[np.ndarray, int], renormalize: bool) -> None:
    logits, top_k = batch
    sel = TopK().select(logits, top_k, renormalize=renormalize)
    np.testing.assert_array_equal(sel.expert_ids, np.argsort(-logits, axis=-1, kind="stable")[..., :top_k])
    p = np.take_along_axis(softmax(logits), sel.expert_ids, axis=-1)
    expected = p / p.sum(axis=-1, keepdims=True) if renormalize else p
    np.testing.assert_allclose(sel.weights, expected, rtol=1e-12)


@SETTINGS
@given(batches(), lynx_policies)
def test_lynx_matches_exact_reference(batch: tuple[np.ndarray, int], lynx: Lynx) -> None:
    logits, top_k = batch
    sel = lynx.select(logits, top_k)
    for layer, layer_logits in enumerate(logits):
        ids, kept, deepest = lynx_reference(layer_logits, top_k, lynx.alpha, lynx.beta)
        # float64 resolves the popularity term exactly while B ** -(deepest + 2) is far above its precision.
        assume(layer_logits.shape[0] ** (deepest + 2) < 2**40)
        np.testing.assert_array_equal(sel.expert_ids[layer], ids)
        assert set(sel.expert_ids[layer].ravel().tolist()) <= kept
        assert len(kept) <= min(logits.shape[-1], logits.shape[1] * top_k)
        # Each token runs its best k inside kept.
        inside = np.where(np.isin(np.arange(logits.shape[-1]), sorted(kept)), layer_logits, -np.inf)
        chosen = np.take_along_axis(layer_logits, sel.expert_ids[layer], axis=-1)
        unchosen = inside.copy()
        np.put_along_axis(unchosen, sel.expert_ids[layer], -np.inf, axis=-1)
        assert (chosen.min(axis=-1) >= unchosen.max(axis=-1)).all()


@SETTINGS
@given(batches(max_tokens=1), lynx_policies, st.booleans())
def test_lynx_single_token_is_topk_exactly(batch: tuple[np.ndarray, int], lynx: Lynx, renormalize: bool) -> None:
    logits, top_k = batch
    sel = lynx.select(logits, top_k, renormalize=renormalize)
    ref = TopK().select(logits, top_k, renormalize=renormalize)
    np.testing.assert_array_equal(sel.expert_ids, ref.expert_ids)
    np.testing.assert_array_equal(sel.weights, ref.weights)


@SETTINGS
@given(batches(), lynx_policies)
def test_lynx_unrenormalized_weights_carry_original_topk_mass(batch: tuple[np.ndarray, int], lynx: Lynx) -> None:
    logits, top_k = batch
    sel = lynx.select(logits, top_k, renormalize=False)
    ref = TopK().select(logits, top_k, renormalize=False)
    np.testing.assert_allclose(sel.weights.sum(axis=-1), ref.weights.sum(axis=-1), rtol=1e-12)
    # Within a token, weights keep softmax proportions: w_i / w_j = exp(L_i - L_j).
    chosen = np.take_along_axis(logits, sel.expert_ids, axis=-1)
    np.testing.assert_allclose(sel.weights / sel.weights[..., :1], np.exp(chosen - chosen[..., :1]), rtol=1e-12)


@SETTINGS
@given(batches(), lynx_policies, st.data())
def test_lynx_is_token_order_equivariant(batch: tuple[np.ndarray, int], lynx: Lynx, data: st.DataObject) -> None:
    # The rule is symmetric in the tokens of a batch; summing popularity bin by bin keeps that exact in floats.
    logits, top_k = batch
    perm = np.array(data.draw(st.permutations(range(logits.shape[1]))))
    sel = lynx.select(logits, top_k)
    shuffled = lynx.select(logits[:, perm], top_k)
    np.testing.assert_array_equal(shuffled.expert_ids, sel.expert_ids[:, perm])
    np.testing.assert_array_equal(shuffled.weights, sel.weights[:, perm])


@SETTINGS
@given(batches(), policies)
def test_distinct_experts_bounds(batch: tuple[np.ndarray, int], policy: TopK | Lynx) -> None:
    logits, top_k = batch
    distinct = distinct_experts(policy.select(logits, top_k).expert_ids, logits.shape[-1])
    assert distinct.shape == (logits.shape[0],)
    assert (distinct >= top_k).all()
    assert (distinct <= min(logits.shape[-1], logits.shape[1] * top_k)).all()
