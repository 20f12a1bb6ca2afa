"""Property tests for every registered policy on small random batches.

Logits come either from a coarse grid (many exact ties, so the tie rules are exercised) or from continuous
floats. Lynx is checked against a loop-per-token reference that evaluates the rule of README.md ("Policies") in exact
rational arithmetic, which pins down both the rule and the tie-breaking; every other policy against a
loop-per-token reference of its module's rule (second half of this file).

Not asserted, because it is false: "Lynx activates no more distinct experts than top-k". Voting by popularity
can move a token off its top-k onto an expert no token had in its top-k; test_policy_lynx.py, example 5, is
a worked counterexample. What holds is the bound by the kept set (at most B*k and E).
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from lynxsim.datatypes import DROPPED
from lynxsim.policies import OEA, POLICY_NAMES, Capacity, Lynx, Prune, Skip, TopK, TopP, Vote, needs_calibration
from lynxsim.policies.activity import distinct_experts
from lynxsim.policies.proxies import quality_proxies

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


# ---------------------------------------------------------------------------------------------------------
# Every registered policy. Each is drawn with valid parameters for the batch (``draw_policy``), checked
# against the Selection contract, against a loop-per-token reference of its rule where it has one (exact
# ids, so the tie rules are pinned down too), and for the documented behaviour of a one-token batch.

FAST = settings(max_examples=60, deadline=None)

REPICK = {"lynx", "oea", "prune", "vote"}
"""Policies that re-pick inside a kept set: unrenormalized weights carry the original top-k mass."""
DROPPING = {"skip", "topp", "capacity"}
"""Policies that only drop top-k assignments: unrenormalized weights are the raw probabilities."""
PER_TOKEN = {"topk", "skip", "topp", "prune"}
"""Policies whose choice for a token does not depend on the rest of the batch."""


def draw_policy(name: str, data: st.DataObject, top_k: int, num_experts: int):  # type: ignore[no-untyped-def]
    """A policy ``name`` with parameters valid for this top_k and expert count (scalar parameters only)."""
    if name == "topk":
        return TopK()
    if name == "lynx":
        return data.draw(lynx_policies)
    if name == "oea":
        return OEA(k0=data.draw(st.integers(1, top_k)))
    if name == "skip":
        return Skip(beta=data.draw(st.sampled_from([0.0, 0.25, 0.5, 1.0, 1.5]) | st.floats(0, 1.2)))
    if name == "topp":
        return TopP(p=data.draw(st.sampled_from([0.25, 0.5, 1.0]) | st.floats(0.01, 1.0)))
    if name == "prune":
        kept = data.draw(st.lists(st.integers(0, num_experts - 1), min_size=1, max_size=num_experts, unique=True))
        return Prune(kept_experts=kept)
    if name == "capacity":
        return Capacity(capacity_factor=data.draw(st.sampled_from([0.25, 0.5, 1.0, 1.25, 2.0]) | st.floats(0.05, 4)))
    if name == "vote":
        return Vote(budget=data.draw(st.integers(1, num_experts + 1)))
    raise AssertionError(f"no strategy for policy {name!r}: add one to draw_policy")


def test_every_registered_policy_is_covered() -> None:
    # A new policy must be classified here and get a strategy in draw_policy (which raises otherwise).
    for name in POLICY_NAMES:
        assert name in REPICK | DROPPING | {"topk"}, name


def softmax_rows(x: np.ndarray) -> np.ndarray:
    """Softmax along the last axis with the policies' float operations (exp of logit - max, over the sum)."""
    numer = np.exp(x - x.max(axis=-1, keepdims=True))
    return numer / numer.sum(axis=-1, keepdims=True)


def ranked(row: list[float]) -> list[int]:
    """Expert ids by logit descending, ties by lower id."""
    return sorted(range(len(row)), key=lambda e: (-row[e], e))


def pick_within(rows: list[list[float]], kept: set[int], top_k: int) -> np.ndarray:
    out = []
    for row in rows:
        chosen = [e for e in ranked(row) if e in kept][:top_k]
        out.append(chosen + [DROPPED] * (top_k - len(chosen)))
    return np.array(out, dtype=np.int64)


def reference_ids(policy, layer_logits: np.ndarray, top_k: int) -> np.ndarray | None:  # type: ignore[no-untyped-def]
    """One layer's ids by the policy's rule, token by token (None for policies tested elsewhere)."""
    rows = layer_logits.tolist()
    p = softmax_rows(layer_logits)
    if isinstance(policy, OEA):
        union = {e for row in rows for e in ranked(row)[: policy.k0]}
        return pick_within(rows, union, top_k)
    if isinstance(policy, Vote):
        votes = [0] * len(rows[0])
        for row in rows:
            for e in ranked(row)[:top_k]:
                votes[e] += 1
        mass = p.sum(axis=0).tolist()
        order = sorted((e for e in range(len(votes)) if votes[e] > 0), key=lambda e: (-votes[e], -mass[e], e))
        return pick_within(rows, set(order[: policy.budget]), top_k)
    if isinstance(policy, Prune):
        return pick_within(rows, set(policy.kept_experts), top_k)  # type: ignore[arg-type]
    if isinstance(policy, Skip):
        out = []
        for row in rows:
            top = ranked(row)[:top_k]
            ids = [top[0]] + [e for e in top[1:] if not math.exp(row[e] - row[top[0]]) < policy.beta]
            out.append(ids + [DROPPED] * (top_k - len(ids)))
        return np.array(out, dtype=np.int64)
    if isinstance(policy, TopP):
        out = []
        for t, row in enumerate(rows):
            ids, mass = [], 0.0
            for e in ranked(row)[:top_k]:
                ids.append(e)
                mass += p[t, e]
                if mass > policy.p:
                    break
            out.append(ids + [DROPPED] * (top_k - len(ids)))
        return np.array(out, dtype=np.int64)
    if isinstance(policy, Capacity):
        tokens, experts = len(rows), len(rows[0])
        capacity = max(1, math.ceil(round(policy.capacity_factor * tokens * top_k / experts, 9)))
        log_p = layer_logits - layer_logits.max(axis=-1, keepdims=True)
        log_p = log_p - np.log(np.exp(log_p).sum(axis=-1, keepdims=True))
        claims: dict[int, list[tuple[float, int, int]]] = {}
        for t, row in enumerate(rows):
            for slot, e in enumerate(ranked(row)[:top_k]):
                claims.setdefault(e, []).append((-log_p[t, e], slot, t))
        kept = {(t, e) for e, c in claims.items() for _, _, t in sorted(c)[:capacity]}
        out = []
        for t, row in enumerate(rows):
            ids = [e for e in ranked(row)[:top_k] if (t, e) in kept]
            out.append(ids + [DROPPED] * (top_k - len(ids)))
        return np.array(out, dtype=np.int64)
    return None


@FAST
@pytest.mark.parametrize("name", POLICY_NAMES)
@given(batch=batches(), renormalize=st.booleans(), data=st.data())
def test_every_policy_keeps_the_selection_contract(
    name: str, batch: tuple[np.ndarray, int], renormalize: bool, data: st.DataObject
) -> None:
    logits, top_k = batch
    num_experts = logits.shape[-1]
    policy = draw_policy(name, data, top_k, num_experts)
    assert not needs_calibration(policy)
    sel = policy.select(logits, top_k, renormalize=renormalize)
    ids, w = sel.expert_ids, sel.weights
    assert ids.shape == w.shape == (*logits.shape[:-1], top_k)
    assert ids.dtype == np.int64 and w.dtype == np.float64
    assert ((ids >= DROPPED) & (ids < num_experts)).all()
    used = ids != DROPPED
    assert (used[..., 1:] <= used[..., :-1]).all()  # used slots first
    ordered = np.sort(ids, axis=-1)
    assert (np.diff(ordered, axis=-1)[ordered[..., 1:] != DROPPED] > 0).all()  # distinct among used slots
    chosen = np.where(used, np.take_along_axis(logits, np.where(used, ids, 0), axis=-1), -1e300)
    assert (np.diff(chosen, axis=-1)[used[..., 1:]] <= 0).all()  # strongest first
    assert (w[used] > 0).all() and (w[~used] == 0).all()
    any_used = used.any(axis=-1)
    if name != "capacity":  # only capacity may take every expert away from a token
        assert any_used.all()
    sums = w.sum(axis=-1)
    if renormalize:
        np.testing.assert_allclose(sums[any_used], 1.0, rtol=1e-12)
    else:
        p = softmax_rows(logits)
        topk_mass = np.sort(p, axis=-1)[..., ::-1][..., :top_k].sum(axis=-1)
        if name in REPICK:
            np.testing.assert_allclose(sums, topk_mass, rtol=1e-12)
            # softmax proportions within a token: w_i / w_0 = exp(L_i - L_0)
            np.testing.assert_allclose(
                w[..., 1:] * used[..., 1:] / w[..., :1],
                np.where(used[..., 1:], np.exp(chosen[..., 1:] - chosen[..., :1]), 0),
                rtol=1e-12,
            )
        else:
            np.testing.assert_allclose(
                w, np.where(used, np.take_along_axis(p, np.where(used, ids, 0), axis=-1), 0), rtol=1e-12
            )
    # The quality proxies handle every policy's output, DROPPED slots included.
    proxies = quality_proxies(logits, sel, top_k)
    for value in proxies:
        assert ((value >= 0) & (value <= 1)).all()
    np.testing.assert_allclose(proxies.assignments_dropped, (~used).mean(axis=(-2, -1)))
    if any_used.all():
        assert (proxies.retained_mass > 0).all()


@FAST
@pytest.mark.parametrize("name", POLICY_NAMES)
@given(batch=batches(), renormalize=st.booleans(), data=st.data())
def test_every_policy_is_deterministic_and_stacked_equals_per_layer(
    name: str, batch: tuple[np.ndarray, int], renormalize: bool, data: st.DataObject
) -> None:
    logits, top_k = batch
    policy = draw_policy(name, data, top_k, logits.shape[-1])
    stacked = policy.select(logits, top_k, renormalize=renormalize)
    again = policy.select(logits.copy(), top_k, renormalize=renormalize)
    np.testing.assert_array_equal(stacked.expert_ids, again.expert_ids)
    np.testing.assert_array_equal(stacked.weights, again.weights)
    for layer in range(logits.shape[0]):
        single = policy.select(logits[layer], top_k, renormalize=renormalize)
        np.testing.assert_array_equal(stacked.expert_ids[layer], single.expert_ids)
        np.testing.assert_array_equal(stacked.weights[layer], single.weights)


@FAST
@pytest.mark.parametrize("name", sorted(set(POLICY_NAMES) - {"topk", "lynx"}))
@given(batch=batches(), data=st.data())
def test_every_policy_matches_its_reference(name: str, batch: tuple[np.ndarray, int], data: st.DataObject) -> None:
    logits, top_k = batch
    policy = draw_policy(name, data, top_k, logits.shape[-1])
    sel = policy.select(logits, top_k)
    topk = TopK().select(logits, top_k).expert_ids
    for layer, layer_logits in enumerate(logits):
        expected = reference_ids(policy, layer_logits, top_k)
        assert expected is not None
        np.testing.assert_array_equal(sel.expert_ids[layer], expected)
        used = sel.expert_ids[layer] != DROPPED
        if name in DROPPING:  # a subset of each token's own top-k assignments
            assert (np.isin(sel.expert_ids[layer], topk[layer]) | ~used).all()
            assert all(
                set(row[row != DROPPED]) <= set(ref)
                for row, ref in zip(sel.expert_ids[layer], topk[layer], strict=True)
            )
        if name in {"oea", "vote"}:  # inside the experts top-k activates: never more distinct experts
            assert set(sel.expert_ids[layer][used].tolist()) <= set(topk[layer].ravel().tolist())


@FAST
@pytest.mark.parametrize("name", POLICY_NAMES)
@given(batch=batches(max_tokens=1), renormalize=st.booleans(), data=st.data())
def test_one_token_batch(name: str, batch: tuple[np.ndarray, int], renormalize: bool, data: st.DataObject) -> None:
    # Documented one-token behaviour: topk, lynx and capacity (any factor) give exactly top-k; oea gives the
    # token's top-k0 then DROPPED; vote its top-min(budget, k) then DROPPED; skip, topp and prune are per
    # token anyway (see test_per_token_policies_ignore_the_rest_of_the_batch).
    logits, top_k = batch
    policy = draw_policy(name, data, top_k, logits.shape[-1])
    sel = policy.select(logits, top_k, renormalize=renormalize)
    ref = TopK().select(logits, top_k, renormalize=renormalize)
    expected_used = {"oea": getattr(policy, "k0", 0), "vote": min(getattr(policy, "budget", 0), top_k)}.get(name)
    if name in {"topk", "lynx", "capacity"} or (expected_used == top_k):
        np.testing.assert_array_equal(sel.expert_ids, ref.expert_ids)
        np.testing.assert_array_equal(sel.weights, ref.weights)  # bit-identical
    elif name == "oea":
        np.testing.assert_array_equal(sel.expert_ids[..., :expected_used], ref.expert_ids[..., :expected_used])
        assert (sel.expert_ids[..., expected_used:] == DROPPED).all()
    elif name == "vote":
        # Every top-k expert has one vote: the budget goes by the tie rule, summed (here: the token's own)
        # probability, then lower id. (Probability, not logit: logits 1e-200 apart tie as probabilities.)
        assert (sel.expert_ids[..., expected_used:] == DROPPED).all()
        p = softmax_rows(logits)
        for layer in range(logits.shape[0]):
            best = sorted(ref.expert_ids[layer, 0].tolist(), key=lambda e: (-p[layer, 0, e], e))[:expected_used]
            assert set(sel.expert_ids[layer, 0, :expected_used].tolist()) == set(best)


@FAST
@pytest.mark.parametrize("name", sorted(PER_TOKEN))
@given(batch=batches(), renormalize=st.booleans(), data=st.data())
def test_per_token_policies_ignore_the_rest_of_the_batch(
    name: str, batch: tuple[np.ndarray, int], renormalize: bool, data: st.DataObject
) -> None:
    logits, top_k = batch
    policy = draw_policy(name, data, top_k, logits.shape[-1])
    sel = policy.select(logits, top_k, renormalize=renormalize)
    for token in range(logits.shape[1]):
        alone = policy.select(logits[:, token : token + 1], top_k, renormalize=renormalize)
        np.testing.assert_array_equal(sel.expert_ids[:, token : token + 1], alone.expert_ids)
        np.testing.assert_array_equal(sel.weights[:, token : token + 1], alone.weights)


@FAST
@given(batch=batches(max_tokens=8), data=st.data())
def test_calibrated_policies_equal_their_explicit_counterparts(
    batch: tuple[np.ndarray, int], data: st.DataObject
) -> None:
    sample, top_k = batch
    logits = data.draw(arrays(np.float64, (sample.shape[0], 5, sample.shape[-1]), elements=st.floats(-6, 6)))
    # skip: beta_l = median over the sample of w1 / w0 = exp(L_(2) - L_(1)).
    skip = Skip().calibrate(sample, top_k)
    top2 = -np.sort(-sample, axis=-1)[..., :2]
    medians = [float(np.median(np.exp(layer[:, 1] - layer[:, 0]))) for layer in top2]
    assert skip == Skip(beta=medians)
    np.testing.assert_array_equal(
        skip.select(logits, top_k).expert_ids, Skip(beta=medians).select(logits, top_k).expert_ids
    )
    # prune: the keep most used experts per layer (ties: summed probability, then lower id).
    keep = data.draw(st.integers(1, sample.shape[-1]))
    prune = Prune(keep=keep).calibrate(sample, top_k)
    kept = []
    for layer in sample:
        counts = [0] * layer.shape[-1]
        for row in layer.tolist():
            for e in ranked(row)[:top_k]:
                counts[e] += 1
        mass = softmax_rows(layer).sum(axis=0).tolist()
        kept.append(sorted(sorted(range(len(counts)), key=lambda e: (-counts[e], -mass[e], e))[:keep]))
    explicit = Prune(keep=keep, kept_experts=kept)
    assert prune == explicit and not needs_calibration(prune)
    np.testing.assert_array_equal(prune.select(logits, top_k).expert_ids, explicit.select(logits, top_k).expert_ids)
    np.testing.assert_array_equal(prune.select(logits, top_k).weights, explicit.select(logits, top_k).weights)
