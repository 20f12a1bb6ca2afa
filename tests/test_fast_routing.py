"""The numba fast paths against their numpy references: the same logits bit for bit, the same counts, the same
proxies (within 1e-6: the retained mass sums exponentials in another order).

Synthetic logits: ``SyntheticRouting.logits`` (kernels) against ``numpy_logits``. Selection: ``route_counts``
(kernels for top-k and Lynx: ``column_kernels`` for few experts, ``selection_kernels`` for many, and the two
against each other, bit for bit) against ``numpy_route_counts``, which goes through ``select``,
``expert_token_counts`` and ``quality_proxies`` as the engine did. Logits are drawn with many exact ties (a
coarse grid) or without, so every tie rule of ``topk.py`` and ``lynx.py`` is exercised; the hand-worked Lynx
batches of ``test_policy_lynx.py`` are run through both paths too.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lynxsim.jit import DISABLE_VARIABLE, kernels
from lynxsim.policies import OEA, Lynx, Policy, Skip, TopK, Vote
from lynxsim.policies import kernels as route_kernels
from lynxsim.policies.activity import expert_token_counts
from lynxsim.policies.kernels import COLUMN_EXPERTS, numpy_route_counts, route_counts
from lynxsim.policies.proxies import QualityProxies, quality_proxies
from lynxsim.routing import SyntheticRouting, SyntheticRoutingParams
from test_policy_lynx import EXAMPLE1, EXAMPLE2, EXAMPLE3, EXAMPLE4, EXAMPLE5

pytest.importorskip("numba")
if kernels("lynxsim.policies.selection_kernels") is None:  # LYNXSIM_NO_NUMBA set: nothing to compare
    pytest.skip(f"{DISABLE_VARIABLE} is set", allow_module_level=True)

SETTINGS = settings(max_examples=60, deadline=None)


def _assert_same(logits: np.ndarray, policy: Policy, top_k: int) -> tuple[np.ndarray, QualityProxies]:
    """route_counts equals its numpy reference on ``logits`` (3-D or 4-D); returns the kernels' result."""
    counts, proxies = route_counts(logits, policy, top_k)
    grouped = logits if logits.ndim == 4 else logits[:, None]
    ref_counts, ref_proxies = numpy_route_counts(grouped, policy, top_k)
    if logits.ndim == 3:
        ref_counts, ref_proxies = ref_counts[0], QualityProxies(*(p[0] for p in ref_proxies))
    assert counts.dtype == np.int32 and counts.shape == ref_counts.shape
    np.testing.assert_array_equal(counts, ref_counts)
    for name, got, want in zip(QualityProxies._fields, proxies, ref_proxies, strict=True):
        assert got.shape == want.shape and got.dtype == np.float64, name
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6, err_msg=name)
    return counts, proxies


EXPERT_COUNTS = st.sampled_from([2, 5, 8, 8, 64, 256])


@st.composite
def routed_batches(draw: st.DrawFn, expert_counts: st.SearchStrategy[int] = EXPERT_COUNTS) -> tuple[np.ndarray, int]:
    """Logits ``[layers, groups, tokens, experts]`` (float32 or float64, tied or not) and a top_k in 1..8."""
    layers = draw(st.integers(1, 3))
    groups = draw(st.integers(1, 3))
    tokens = draw(st.sampled_from([1, 1, 2, 3, 7, 16, 33]))
    experts = draw(expert_counts)
    top_k = draw(st.integers(1, min(8, experts)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    shape = (layers, groups, tokens, experts)
    style = draw(st.sampled_from(["grid", "normal", "wide"]))
    if style == "grid":  # many exact ties, within and across tokens
        logits = rng.integers(-6, 3, size=shape) * 0.5
    elif style == "normal":
        logits = rng.normal(scale=draw(st.sampled_from([0.3, 1.4, 4.0])), size=shape)
    else:  # gaps far past the bins: deep depths, and for small batches depths past float64's range of B ** -d
        logits = rng.normal(scale=300.0, size=shape)
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    return logits.astype(dtype), top_k


@st.composite
def lynx_policies(draw: st.DrawFn, layers: int) -> Lynx:
    """Lynx with scalar or per-layer alpha and beta (every floor, and no floor)."""
    alpha = st.sampled_from([0.5, 0.7, 1.0, 3.0]) | st.floats(0.1, 4.0)
    beta = st.sampled_from([1, 2, 4, None])
    if draw(st.booleans()):
        return Lynx(alpha=draw(alpha), beta=draw(beta))
    per_layer = {"min_size": layers, "max_size": layers}
    return Lynx(alpha=draw(st.lists(alpha, **per_layer)), beta=draw(st.lists(beta, **per_layer)))


@SETTINGS
@given(batch=routed_batches(), data=st.data())
def test_lynx_kernel_matches_select(batch: tuple[np.ndarray, int], data: st.DataObject) -> None:
    logits, top_k = batch
    _assert_same(logits, data.draw(lynx_policies(logits.shape[0])), top_k)


@SETTINGS
@given(batch=routed_batches())
def test_topk_kernel_matches_select(batch: tuple[np.ndarray, int]) -> None:
    logits, top_k = batch
    counts, proxies = _assert_same(logits, TopK(), top_k)
    assert (counts.sum(axis=-1) == logits.shape[2] * top_k).all()
    assert (proxies.retained_mass == 1.0).all() and (proxies.assignments_changed == 0.0).all()


def _assert_rows_equal_columns(logits: np.ndarray, policy: Policy, top_k: int) -> None:
    """route_counts gives the same counts and proxies, bit for bit, from column_kernels (few experts) and from
    selection_kernels: a run's records do not depend on which of the two ranked its batches."""
    assert logits.shape[-1] <= COLUMN_EXPERTS
    columns = route_counts(logits, policy, top_k)
    with mock.patch.object(route_kernels, "COLUMN_EXPERTS", 0):
        rows = route_counts(logits, policy, top_k)
    np.testing.assert_array_equal(columns[0], rows[0])
    for name, got, want in zip(QualityProxies._fields, columns[1], rows[1], strict=True):
        assert got.tobytes() == want.tobytes(), name


FEW_EXPERTS = st.sampled_from([2, 3, 5, 8, 8, 16])


@SETTINGS
@given(batch=routed_batches(FEW_EXPERTS), data=st.data())
def test_column_kernels_equal_row_kernels(batch: tuple[np.ndarray, int], data: st.DataObject) -> None:
    logits, top_k = batch
    _assert_rows_equal_columns(logits, data.draw(lynx_policies(logits.shape[0])), top_k)
    _assert_rows_equal_columns(logits, TopK(), top_k)


def test_column_kernel_hands_bins_past_the_table_to_the_row_kernel() -> None:
    # Two tokens, no floor: a gap of 2,000 logits at alpha 1 is depth 2,000, past bin_weights(2)'s 1,074 depths.
    logits = np.zeros((2, 1, 2, 8))
    logits[1, 0, 1, 3] = 2000.0
    logits[1, 0, 0, :] = np.arange(8.0)
    for policy in (Lynx(alpha=1, beta=None), Lynx(alpha=[1.0, 1.0], beta=[None, 2])):
        _assert_same(logits, policy, 2)
        _assert_rows_equal_columns(logits, policy, 2)


@pytest.mark.parametrize(
    ("logits", "top_k", "policy"),
    [
        (EXAMPLE1, 2, Lynx(alpha=1, beta=2)),
        (EXAMPLE2, 1, Lynx(alpha=1, beta=1)),
        (EXAMPLE3, 3, Lynx(alpha=1, beta=1)),
        (EXAMPLE4, 1, Lynx(alpha=1, beta=None)),
        (EXAMPLE4, 1, Lynx(alpha=1, beta=1)),
        (EXAMPLE5, 1, Lynx(alpha=1, beta=None)),
    ],
)
def test_hand_worked_lynx_batches(logits: np.ndarray, top_k: int, policy: Lynx) -> None:
    counts, _ = _assert_same(logits[None], policy, top_k)
    selected = policy.select(logits, top_k).expert_ids
    np.testing.assert_array_equal(counts[0], expert_token_counts(selected, logits.shape[-1]))


def test_example1_counts_and_proxies() -> None:
    # test_policy_lynx.py, example 1: Lynx runs [[0, 1], [0, 1], [1, 0], [3, 1]]; token 1 loses expert 2 for 1.
    counts, proxies = route_counts(EXAMPLE1[None].astype(np.float32), Lynx(alpha=1, beta=2), 2)
    np.testing.assert_array_equal(counts, [[2 + 1, 4, 0, 1, 0]])
    assert proxies.top1_kept[0] == 1.0 and proxies.assignments_changed[0] == 1 / 8
    assert proxies.assignments_dropped[0] == 0.0 and proxies.retained_mass[0] < 1.0


def test_groups_are_independent_batches() -> None:
    logits = np.random.default_rng(3).normal(size=(4, 3, 9, 16))
    lynx = Lynx(alpha=[1.0, 2.0, 3.0, 0.7], beta=[1, None, 2, 2])
    counts, proxies = route_counts(logits, lynx, 3)
    assert counts.shape == (3, 4, 16) and all(p.shape == (3, 4) for p in proxies)
    for g in range(3):
        alone, alone_proxies = route_counts(logits[:, g], lynx, 3)
        np.testing.assert_array_equal(counts[g], alone)
        for grouped, single in zip(proxies, alone_proxies, strict=True):
            np.testing.assert_array_equal(grouped[g], single)


@pytest.mark.parametrize("policy", [OEA(k0=1), Skip(beta=0.5), Vote(budget=4)])
def test_other_policies_go_through_select(policy: Policy) -> None:
    logits = np.random.default_rng(4).normal(size=(2, 2, 6, 8)).astype(np.float32)
    counts, proxies = route_counts(logits, policy, 2)
    for g in range(2):
        selection = policy.select(logits[:, g], 2)
        np.testing.assert_array_equal(counts[g], expert_token_counts(selection.expert_ids, 8))
        for got, want in zip(proxies, quality_proxies(logits[:, g], selection, 2), strict=True):
            np.testing.assert_array_equal(got[g], want)


@pytest.mark.parametrize("policy", [TopK(), Lynx(alpha=1, beta=1)])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_logits_are_refused(policy: Policy, bad: float) -> None:
    logits = np.zeros((2, 3, 8), dtype=np.float32)
    logits[1, 2, 5] = bad
    with pytest.raises(ValueError, match="finite"):
        route_counts(logits, policy, 2)


def test_bad_calls_raise_what_select_raises() -> None:
    logits = np.zeros((2, 3, 8))
    with pytest.raises(ValueError, match="top_k"):
        route_counts(logits, TopK(), 9)
    with pytest.raises(ValueError, match="3 per-layer values"):
        route_counts(logits, Lynx(alpha=[1.0, 1.0, 1.0], beta=1), 2)
    with pytest.raises(ValueError, match="shape"):
        route_counts(np.zeros((3, 8)), TopK(), 2)


# ---------------------------------------------------------------- synthetic logits


@st.composite
def routers(draw: st.DrawFn) -> tuple[SyntheticRouting, SyntheticRouting]:
    """Two identical synthetic routers (one per path), with scalar or per-layer parameters."""
    layers = draw(st.integers(1, 9))
    experts = draw(st.sampled_from([2, 3, 5, 8, 13, 64, 256]))

    def per_layer(values: st.SearchStrategy[float]) -> st.SearchStrategy[float | list[float]]:
        return values | st.lists(values, min_size=layers, max_size=layers)

    params = SyntheticRoutingParams(
        popularity_skew=draw(per_layer(st.sampled_from([0.0, 0.15, 2.0]))),
        confidence_mean=draw(per_layer(st.sampled_from([0.5, 1.4, 3.0]))),
        confidence_spread=draw(per_layer(st.sampled_from([0.0, 0.2, 0.8]))),
        persistence=draw(per_layer(st.sampled_from([0.0, 0.3, 0.95]))),
    )
    seed = draw(st.integers(-(2**63), 2**63 - 1))
    cache = draw(st.sampled_from([0, 3 * (layers * experts * 4 + 256), 128 * 2**20]))
    fast = SyntheticRouting(layers, experts, params, seed, request_cache_bytes=cache)
    return fast, SyntheticRouting(layers, experts, params, seed, request_cache_bytes=cache)


@SETTINGS
@given(pair=routers(), data=st.data())
def test_synthetic_kernel_is_bit_identical(
    pair: tuple[SyntheticRouting, SyntheticRouting], data: st.DataObject
) -> None:
    fast, reference = pair
    for _ in range(3):  # successive calls: cache hits, misses and evictions on both sides
        request = st.integers(-(2**40), 2**40) | st.integers(0, 5)  # small ids repeat: cache hits
        tokens = data.draw(st.lists(st.tuples(request, st.integers(0, 2**20)), min_size=1, max_size=40))
        requests = np.array([r for r, _ in tokens], dtype=np.int64)
        positions = np.array([p for _, p in tokens], dtype=np.int64)
        got, want = fast.logits(requests, positions), reference.numpy_logits(requests, positions)
        assert got.dtype == want.dtype == np.float32 and got.shape == want.shape
        assert got.tobytes() == np.ascontiguousarray(want).tobytes()


@pytest.mark.parametrize(("experts", "top_k"), [(64, 6), (8, 2)])  # selection_kernels, column_kernels
def test_synthetic_logits_without_numba(experts: int, top_k: int) -> None:
    """LYNXSIM_NO_NUMBA=1 in a fresh process: no kernel is loaded, and the numpy path gives the kernels' bits."""
    code = (
        "import hashlib, numpy as np\n"
        "from lynxsim.jit import kernels\n"
        "from lynxsim.policies import Lynx\n"
        "from lynxsim.policies.kernels import route_counts\n"
        "from lynxsim.routing import SyntheticRouting\n"
        "assert kernels('lynxsim.routing.synthetic_kernels') is None\n"
        f"out = SyntheticRouting(5, {experts}, seed=9).logits(np.arange(12), np.full(12, 30))\n"
        f"counts, _ = route_counts(out, Lynx(alpha=1, beta=2), {top_k})\n"
        "print(hashlib.sha256(out.tobytes()).hexdigest(), hashlib.sha256(counts.tobytes()).hexdigest())\n"
    )
    env = {**os.environ, DISABLE_VARIABLE: "1"}
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    here = SyntheticRouting(5, experts, seed=9).logits(np.arange(12), np.full(12, 30))
    counts, _ = route_counts(here, Lynx(alpha=1, beta=2), top_k)
    digests = [hashlib.sha256(here.tobytes()).hexdigest(), hashlib.sha256(counts.tobytes()).hexdigest()]
    assert child.stdout.split() == digests
