"""The routing traces exported from the trained quality models (traces/lynxsim_*.npz) load, hold what
traces/README.md says, and replay in the simulator like any other trace (no torch needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lynxsim.policies import Lynx, TopK
from lynxsim.policies.activity import distinct_experts
from lynxsim.routing import TraceReplayRouting, load_trace

TRACES = Path(__file__).resolve().parents[1] / "traces"


@pytest.mark.parametrize(
    ("name", "experts", "top_k"), [("lynxsim_mixtral_like", 8, 2), ("lynxsim_qwen2moe_like", 64, 8)]
)
def test_committed_trace_loads_and_replays(name: str, experts: int, top_k: int) -> None:
    path = TRACES / f"{name}.npz"
    assert path.stat().st_size < 4e6
    trace = load_trace(path)
    assert trace.logits.shape == (6, 32 * 256, experts)
    assert np.unique(trace.sequence_ids).size == 32 and trace.positions.max() == 255
    assert "PSF" in trace.license and "seed 0" in trace.model
    # Log-probabilities (float16 in the file): each token's probabilities sum to 1.
    np.testing.assert_allclose(np.exp(trace.logits.astype(np.float64)).sum(-1), 1.0, atol=2e-2)

    routing = TraceReplayRouting(trace, seed=0, num_moe_layers=6, num_experts=experts)
    logits = routing.logits(np.arange(16), np.full(16, 40))
    assert logits.shape == (6, 16, experts)
    # A trained router is not uniform: Lynx at B=16 activates no more experts than top-k does.
    topk = distinct_experts(TopK().select(logits, top_k).expert_ids, experts)
    lynx = distinct_experts(Lynx(alpha=3.0, beta=2).select(logits, top_k).expert_ids, experts)
    assert (lynx <= topk).all() and topk.min() > top_k
