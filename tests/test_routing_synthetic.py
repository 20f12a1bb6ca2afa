"""Tests of the counter-based hash and the seeded synthetic router.

The statistical checks use fixed seeds and bounds several standard errors wide, so they are deterministic
and not flaky; each says what behaviour of real routers it stands for.
"""

from __future__ import annotations

import hashlib
import math
import statistics
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from lynxsim.routing import RoutingSource, SyntheticRouting, SyntheticRoutingParams
from lynxsim.routing.hashing import NORMAL_TABLE, combine, derive_key, exp_exact, normals, uniforms

NORMAL_TABLE_SHA256 = "1cfbba1e07e34386a57626f82aeb43e6ed54ba70a3ea6b7d964dc66a841074a8"


def _softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = np.exp(x - x.max(-1, keepdims=True))
    return x / x.sum(-1, keepdims=True)


def _decode_batch(num_requests: int, position: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """One token per request, as in a pure-decode iteration."""
    return np.arange(num_requests, dtype=np.int64), np.full(num_requests, position, dtype=np.int64)


def _mean_distinct_experts(logits: np.ndarray, batch: int, top_k: int) -> float:
    """Mean over layers and disjoint batches of the number of distinct experts the batch's top-k activate."""
    layers, tokens, experts = logits.shape
    num_batches = tokens // batch
    top = np.argpartition(-logits[:, : num_batches * batch], top_k - 1, axis=-1)[..., :top_k]
    active = np.zeros((layers, num_batches, experts), dtype=bool)
    np.put_along_axis(active, top.reshape(layers, num_batches, batch * top_k), True, axis=-1)
    return float(active.sum(-1).mean())


# ---------------------------------------------------------------- hashing


def test_combine_is_splitmix64() -> None:
    # Reference outputs of splitmix64 seeded with 0 (Vigna's splitmix64.c): the chaining step under key 0
    # is exactly that generator, so the hash is the published one and not a look-alike.
    assert [int(combine(0, i)) for i in (1, 2, 3)] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]


def test_hash_is_elementwise_and_broadcasts() -> None:
    keys = combine(derive_key(7, 1), np.arange(5))
    counters = np.arange(6, dtype=np.uint64)
    full = normals(keys[:, None], counters[None, :])
    assert full.shape == (5, 24) and full.dtype == np.float32
    # One (key, counter) word drawn alone gives the same four normals as inside the full block.
    alone = normals(keys[3], counters[4:5])
    assert np.array_equal(alone, full[3, 16:20])


def test_normal_table_is_pinned() -> None:
    """The table is computed in float64 by Python's statistics module and rounded to float32: the same bytes on
    every machine, which this digest checks (a different table would change every synthetic logit)."""
    assert NORMAL_TABLE.shape == (65536,) and NORMAL_TABLE.dtype == np.float32
    assert hashlib.sha256(NORMAL_TABLE.astype("<f4").tobytes()).hexdigest() == NORMAL_TABLE_SHA256
    assert np.array_equal(NORMAL_TABLE, -NORMAL_TABLE[::-1])  # symmetric, so the mean is exactly 0
    assert NORMAL_TABLE[0] == np.float32(statistics.NormalDist().inv_cdf(0.5 / 65536))


def test_each_quarter_of_a_word_indexes_the_table() -> None:
    key, counter = derive_key(5, 9), 3
    word = int(combine(np.uint64(key), counter))
    expected = [NORMAL_TABLE[(word >> (16 * q)) & 0xFFFF] for q in range(4)]
    assert np.array_equal(normals(key, np.array([counter])), expected)


def test_exp_exact_is_exp() -> None:
    x = np.linspace(-30.0, 30.0, 200_001)
    assert np.abs(exp_exact(x) / np.exp(x) - 1.0).max() < 5e-16
    assert exp_exact(np.zeros(1))[0] == 1.0


def test_uniforms_are_uniform() -> None:
    n = 100_000
    u = np.sort(uniforms(combine(derive_key(1, 2), np.arange(n))))
    assert 0.0 < u[0] and u[-1] < 1.0
    # Kolmogorov-Smirnov distance to U(0, 1); the 0.1% critical value for n = 1e5 is 1.95/sqrt(n) = 0.0062.
    grid = np.arange(1, n + 1) / n
    ks = max(np.abs(grid - u).max(), np.abs(grid - 1.0 / n - u).max())
    assert ks < 0.01


def test_normals_are_standard_normal() -> None:
    z = normals(derive_key(3), np.arange(25_000)).astype(np.float64)  # 1e5 normals
    assert abs(z.mean()) < 0.015 and abs(z.std() - 1.0) < 0.015
    cdf = 0.5 * (1.0 + np.array([math.erf(x / math.sqrt(2.0)) for x in np.sort(z)]))
    grid = np.arange(1, z.size + 1) / z.size
    assert np.abs(grid - cdf).max() < 0.01
    # The four normals of one word (its four 16-bit quarters) are independent.
    quarters = z.reshape(-1, 4)
    for a, b in ((0, 1), (1, 2), (2, 3), (0, 3)):
        assert abs(np.corrcoef(quarters[:, a], quarters[:, b])[0, 1]) < 0.015


def test_hash_of_structured_keys_is_uncorrelated() -> None:
    # Neighbouring request ids and positions (the usual case) must not give related numbers.
    keys = combine(combine(derive_key(0, 3), np.arange(200)[:, None]), np.arange(200)[None, :])
    z = normals(keys[..., None], np.zeros(1, dtype=np.uint64))[..., 0].astype(np.float64)
    assert abs(np.corrcoef(z[:-1].ravel(), z[1:].ravel())[0, 1]) < 0.02
    assert abs(np.corrcoef(z[:, :-1].ravel(), z[:, 1:].ravel())[0, 1]) < 0.02


# ---------------------------------------------------------------- parameters


@pytest.mark.parametrize(
    "bad",
    [
        {"popularity_skew": -0.1},
        {"confidence_mean": 0.0},
        {"confidence_spread": -1.0},
        {"persistence": 1.0},
        {"persistence": -0.01},
        {"confidence_mean": float("nan")},
        {"popularity_skew": float("inf")},
        {"temperature": 1.0},
        {"popularity_skew": [0.1, -0.1]},
        {"confidence_mean": [1.0, 0.0]},
        {"confidence_spread": [float("nan")]},
        {"persistence": [0.2, 1.0]},
        {"expert_bias": [[0.0, float("nan")]]},
        {"expert_bias": [[0.0, 1.0], [0.0]]},
        {"expert_bias": [[]]},
        {"expert_bias": []},
    ],
)
def test_params_reject_bad_values(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        SyntheticRoutingParams(**bad)


def test_params_are_frozen_and_documented() -> None:
    params = SyntheticRoutingParams()
    with pytest.raises(ValidationError):
        params.persistence = 0.5  # type: ignore[misc]
    for name, field in SyntheticRoutingParams.model_fields.items():
        assert field.description, name


# ---------------------------------------------------------------- per-layer parameters and a measured bias

PER_LAYER_FIELDS = ("popularity_skew", "confidence_mean", "confidence_spread", "persistence")


@pytest.mark.parametrize("field", PER_LAYER_FIELDS)
def test_a_list_of_one_repeated_value_is_the_scalar(field: str) -> None:
    value = {"popularity_skew": 0.4, "confidence_mean": 1.7, "confidence_spread": 0.35, "persistence": 0.45}[field]
    requests, positions = np.array([3, 3, 9, 12]), np.array([0, 1, 5, 2])
    scalar = SyntheticRouting(3, 10, SyntheticRoutingParams(**{field: value}), seed=2).logits(requests, positions)
    listed = SyntheticRouting(3, 10, SyntheticRoutingParams(**{field: [value] * 3}), seed=2).logits(requests, positions)
    assert np.array_equal(scalar, listed)


@pytest.mark.parametrize("field", PER_LAYER_FIELDS)
def test_a_per_layer_list_must_name_every_layer(field: str) -> None:
    params = SyntheticRoutingParams(**{field: [0.5, 0.5]})
    SyntheticRouting(2, 8, params)
    with pytest.raises(ValueError, match=f"{field} has 2 values, the model has 3 MoE layers"):
        SyntheticRouting(3, 8, params)


def test_expert_bias_must_match_the_model() -> None:
    params = SyntheticRoutingParams(expert_bias=[[0.0] * 8] * 2)
    SyntheticRouting(2, 8, params)
    for layers, experts in ((3, 8), (2, 7)):
        with pytest.raises(ValueError, match="expert_bias must be"):
            SyntheticRouting(layers, experts, params)


def test_per_layer_values_act_on_their_own_layer() -> None:
    """Layer 0 flat, hesitant and forgetful; layer 1 skewed, confident and persistent."""
    params = SyntheticRoutingParams(
        popularity_skew=[0.0, 2.0], confidence_mean=[0.5, 3.0], confidence_spread=[0.0, 0.3], persistence=[0.0, 0.95]
    )
    source = SyntheticRouting(2, 8, params, seed=4)
    requests, positions = np.repeat(np.arange(2000), 2), np.tile([5, 900], 2000)
    logits = source.logits(requests, positions)
    top1 = _softmax(logits).max(-1).mean(-1)
    assert top1[0] < 0.3 < 0.6 < top1[1]
    shares = np.stack([np.bincount(layer, minlength=8) / layer.size for layer in logits.argmax(-1)])
    assert shares[0].max() < 0.15 and shares[1].max() > 0.3
    top = np.sort(np.argsort(-logits, axis=-1)[..., :2], axis=-1)
    same = (top[:, 0::2] == top[:, 1::2]).all(-1).mean(-1)
    assert same[0] < 0.15 and same[1] > 0.5


def test_expert_bias_replaces_the_random_bias() -> None:
    """With unit confidence the logits are bias plus noise, so a given bias shows through exactly; the skew
    that would scale a random bias is then ignored."""
    bias = np.linspace(-1.0, 1.0, 6, dtype=np.float32).reshape(1, 6).repeat(2, axis=0)
    bias[1] *= -1.0

    def logits(expert_bias: list[list[float]], skew: float) -> np.ndarray:
        params = SyntheticRoutingParams(
            expert_bias=expert_bias, popularity_skew=skew, confidence_mean=1.0, confidence_spread=0.0
        )
        return SyntheticRouting(2, 6, params, seed=7).logits(np.arange(50), np.zeros(50, dtype=np.int64))

    zero = np.zeros_like(bias).tolist()
    assert np.allclose(logits(bias.tolist(), 0.1) - logits(zero, 0.1), bias[:, None, :], atol=1e-5)
    assert np.array_equal(logits(bias.tolist(), 0.1), logits(bias.tolist(), 3.0))


# ---------------------------------------------------------------- the routing source contract


@pytest.mark.parametrize(("layers", "experts"), [(1, 2), (3, 5), (32, 8), (4, 64)])
def test_shape_and_dtype(layers: int, experts: int) -> None:
    source: RoutingSource = SyntheticRouting(layers, experts, seed=1)  # statically checked against the protocol
    out = source.logits(np.array([4, 4, 9]), np.array([0, 1, 0]))
    assert out.shape == (layers, 3, experts) and out.dtype == np.float32
    assert np.isfinite(out).all()
    assert source.logits(np.array([], dtype=np.int64), np.array([], dtype=np.int64)).shape == (layers, 0, experts)


def test_rejects_mismatched_inputs() -> None:
    source = SyntheticRouting(2, 4)
    with pytest.raises(ValueError):
        source.logits(np.array([1, 2]), np.array([0]))
    with pytest.raises(ValueError):
        SyntheticRouting(2, 1)


def test_token_logits_do_not_depend_on_the_batch() -> None:
    requests = np.array([3, 3, 3, 8, 12, 8, -5])
    positions = np.array([0, 1, 2, 40, 7, 41, 2**40])
    source = SyntheticRouting(6, 7, seed=11)
    batch = source.logits(requests, positions)
    fresh = SyntheticRouting(6, 7, seed=11, request_cache_bytes=0)
    for i in range(requests.size):
        assert np.array_equal(fresh.logits(requests[i : i + 1], positions[i : i + 1])[:, 0], batch[:, i])
    order = np.array([6, 2, 0, 5, 1, 4, 3])
    assert np.array_equal(SyntheticRouting(6, 7, seed=11).logits(requests[order], positions[order]), batch[:, order])
    # Mixed into an unrelated batch, the same tokens keep their logits.
    others = source.logits(np.concatenate([np.arange(100, 120), requests]), np.concatenate([np.zeros(20), positions]))
    assert np.array_equal(others[:, 20:], batch)


@settings(max_examples=40, deadline=None)
@given(
    tokens=st.lists(
        st.tuples(st.integers(-(2**40), 2**40), st.integers(0, 2**20)), min_size=1, max_size=24, unique=True
    ),
    data=st.data(),
)
def test_any_subset_in_any_order_matches_the_full_batch(tokens: list[tuple[int, int]], data: st.DataObject) -> None:
    requests = np.array([r for r, _ in tokens], dtype=np.int64)
    positions = np.array([p for _, p in tokens], dtype=np.int64)
    full = SyntheticRouting(3, 5, seed=2).logits(requests, positions)
    picked = data.draw(st.lists(st.integers(0, len(tokens) - 1), min_size=1, max_size=len(tokens)))
    # A small cache (two requests) so that the subset's requests are evicted and redrawn along the way.
    source = SyntheticRouting(3, 5, seed=2, request_cache_bytes=2 * (3 * 5 * 4 + 256))
    for _ in range(2):
        assert np.array_equal(source.logits(requests[picked], positions[picked]), full[:, picked])
    assert len(source._request_cache) <= 2


def test_seed_and_params_change_the_logits() -> None:
    requests, positions = _decode_batch(16)
    base = SyntheticRouting(4, 8, seed=0).logits(requests, positions)
    assert not np.array_equal(SyntheticRouting(4, 8, seed=1).logits(requests, positions), base)
    skewed = SyntheticRouting(4, 8, SyntheticRoutingParams(popularity_skew=1.0), seed=0)
    assert not np.array_equal(skewed.logits(requests, positions), base)
    # Neighbouring seeds are unrelated, not shifted copies.
    other = SyntheticRouting(4, 8, seed=1).logits(requests, positions)
    assert abs(np.corrcoef(base.ravel(), other.ravel())[0, 1]) < 0.1


def test_same_in_another_process() -> None:
    code = (
        "import hashlib, numpy as np\n"
        "from lynxsim.routing import SyntheticRouting\n"
        "out = SyntheticRouting(5, 9, seed=123).logits(np.array([7, 1, 7]), np.array([3, 0, 4]))\n"
        "print(hashlib.sha256(out.tobytes()).hexdigest())\n"
    )
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    here = SyntheticRouting(5, 9, seed=123).logits(np.array([7, 1, 7]), np.array([3, 0, 4]))
    assert child.stdout.strip() == hashlib.sha256(here.tobytes()).hexdigest()


def test_cache_is_bounded_and_invisible() -> None:
    per_request = 4 * 16 * 4 + 256
    cached = SyntheticRouting(4, 16, seed=5, request_cache_bytes=10 * per_request)
    uncached = SyntheticRouting(4, 16, seed=5, request_cache_bytes=0)
    rng = np.random.default_rng(0)
    for step in range(30):
        requests = rng.integers(0, 25, size=12)
        positions = np.full(12, step)
        assert np.array_equal(cached.logits(requests, positions), uncached.logits(requests, positions))
        assert len(cached._request_cache) <= 10
    assert len(uncached._request_cache) == 0


# ---------------------------------------------------------------- the three structures of the model


def test_persistence_makes_a_request_reuse_its_experts() -> None:
    """Two positions of one request pick the same top-2 set far more often when rho is near 1."""

    def same_top2_rate(persistence: float) -> float:
        params = SyntheticRoutingParams(persistence=persistence)
        source = SyntheticRouting(8, 8, params, seed=4)
        requests = np.repeat(np.arange(2000), 2)
        positions = np.tile([5, 900], 2000)
        top = np.sort(np.argsort(-source.logits(requests, positions), axis=-1)[..., :2], axis=-1)
        return float((top[:, 0::2] == top[:, 1::2]).all(-1).mean())

    independent, persistent = same_top2_rate(0.0), same_top2_rate(0.95)
    assert independent < 0.1  # about 1/28 for 8 experts, a little more with the popularity skew
    assert persistent > 0.5 and persistent > 5 * independent


def test_zero_skew_spreads_top1_evenly_and_large_skew_concentrates_it() -> None:
    requests, positions = _decode_batch(8000)

    def top1_shares(skew: float) -> np.ndarray:
        source = SyntheticRouting(16, 8, SyntheticRoutingParams(popularity_skew=skew), seed=9)
        top1 = source.logits(requests, positions).argmax(-1)
        return np.stack([np.bincount(layer, minlength=8) / layer.size for layer in top1])

    flat = top1_shares(0.0)
    # Standard error of one share: sqrt(1/8 * 7/8 / 8000) = 0.0037; 0.02 is over 5 of them.
    assert np.abs(flat - 1 / 8).max() < 0.02
    skewed = top1_shares(2.0)
    # In every layer one expert takes over twice its even share of top-1 picks; on average, half of them.
    assert skewed.max(1).min() > 2 / 8 and skewed.max(1).mean() > 0.5


def test_higher_confidence_means_higher_top1_probability() -> None:
    requests, positions = _decode_batch(2000)
    means = []
    for confidence in (0.5, 1.4, 3.0):
        source = SyntheticRouting(8, 8, SyntheticRoutingParams(confidence_mean=confidence), seed=3)
        means.append(_softmax(source.logits(requests, positions)).max(-1).mean())
    assert means[0] < means[1] < means[2]


def test_confidence_mean_is_the_typical_logit_spread() -> None:
    """With no skew or persistence, a token's logits across experts have standard deviation s[t, l],
    whose mean over tokens is confidence_mean whatever the spread (the log-normal is mean-corrected)."""
    requests, positions = _decode_batch(3000)
    for spread in (0.0, 0.6):
        params = SyntheticRoutingParams(
            popularity_skew=0.0, persistence=0.0, confidence_mean=2.0, confidence_spread=spread
        )
        logits = SyntheticRouting(4, 256, params, seed=8).logits(requests, positions).astype(np.float64)
        per_token = logits.std(-1)
        assert per_token.mean() == pytest.approx(2.0, rel=0.03)
        assert (per_token.std() < 0.1) == (spread == 0.0)


def test_defaults_are_realistic_for_an_8_expert_top2_model() -> None:
    """Nearly every expert is active at batch 16 (Lynx, arXiv 2411.08982), and top-1 router probabilities
    are mostly between 0.3 and 0.7, as for Mixtral-8x7B."""
    logits = SyntheticRouting(32, 8, seed=0).logits(*_decode_batch(1600))
    assert _mean_distinct_experts(logits, batch=16, top_k=2) >= 7.0
    assert _mean_distinct_experts(logits, batch=1, top_k=2) == 2.0
    top1 = _softmax(logits).max(-1)
    assert 0.35 < float(np.median(top1)) < 0.55
    assert float(((top1 >= 0.3) & (top1 <= 0.7)).mean()) > 0.6
