"""Top-k unions of token blocks shared across policies: the union of an iteration's tokens, whole blocks read
from the cache, equals routing every token; a run of several policies gives the same records with and without
the shared blocks, and later policies read blocks the first one routed."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lynxsim.runner as runner
from lynxsim.engine.topk_unions import TopKUnions
from lynxsim.routing import SyntheticRouting
from simpy_oracle import oracle_run
from tests.test_decode_runs import _config

ROUTING = SyntheticRouting(4, 16, seed=2)


def _active(request_ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Top-2 union per layer of the tokens' synthetic logits."""
    logits = ROUTING.logits(request_ids, positions)
    top = np.argsort(-logits, axis=-1, kind="stable")[..., :2]
    active = np.zeros((4, 16), dtype=bool)
    for layer in range(4):
        active[layer, np.unique(top[layer])] = True
    return active


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 300), st.integers(1, 200)), min_size=1, max_size=5))
def test_the_union_from_blocks_is_the_union_of_every_token(runs: list[tuple[int, int, int]]) -> None:
    ids = np.concatenate([np.full(n, r, dtype=np.int64) for r, _, n in runs])
    positions = np.concatenate([np.arange(first, first + n) for _, first, n in runs])
    unions = TopKUnions(4, 16)
    expected = _active(ids, positions)
    # the first time (blocks routed) and the second (blocks read); an early stop happens only on a full union,
    # which routing every token would give too
    for _ in range(2):
        assert np.array_equal(unions.union(ids, positions, _active), expected)


def test_several_policies_share_blocks_and_change_no_number(monkeypatch: pytest.MonkeyPatch) -> None:
    # routed from Python, as the oracle does (the engine routes few experts in its loop, without the unions)
    config = _config(max_num_batched_tokens=512)
    shared = runner.prepare(config)
    assert shared.topk_unions is not None and len(shared.topk_unions) == 0
    with_blocks = {label: oracle_run(shared, entry, policy)[1]
                   for label, entry, policy in shared.policies}
    routed = len(shared.topk_unions)
    assert routed > 0
    label, entry, policy = shared.policies[0]
    oracle_run(shared, entry, policy)
    assert len(shared.topk_unions) == routed  # a second pass over the same tokens routes no new block
    monkeypatch.setattr(runner.Setup, "topk_unions", property(lambda self: None))
    alone = runner.prepare(config)
    for label, entry, policy in alone.policies:
        plain = oracle_run(alone, entry, policy)[1]
        assert np.array_equal(plain["latency_s"].to_numpy(), with_blocks[label]["latency_s"].to_numpy())
        assert np.array_equal(np.stack(plain["distinct_experts"]), np.stack(with_blocks[label]["distinct_experts"]))
