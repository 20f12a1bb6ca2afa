"""Decode runs (several pure-decode iterations computed in one step) change no number: the same experiment run
with them and iteration by iteration gives the same requests and the same iterations."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lynxsim.config import ExperimentConfig
from lynxsim.runner import prepare
from simpy_oracle import oracle_run
from simpy_oracle.decode_run import fitting_iterations, grown_blocks
from simpy_oracle.replica import Replica


def _config(parallelism: dict | None = None, simulation: dict | None = None, **serving: object) -> ExperimentConfig:
    return ExperimentConfig.model_validate({
        "deployment": {"parallelism": parallelism or {}},
        "name": "runs",
        "model": "mixtral-8x7b",
        "hardware": "h200",
        "workload": {
            "arrival": {"kind": "poisson", "rate_per_s": 6.0},
            "prompt_tokens": {"kind": "uniform", "low_tokens": 16, "high_tokens": 600},
            "output_tokens": {"kind": "uniform", "low_tokens": 2, "high_tokens": 200},
        },
        "serving": {"max_num_seqs": 64, **serving},
        "policies": [{"name": "topk"}, {"name": "lynx"}],
        "simulation": {"seed": 5, "num_requests": 60, **(simulation or {})},
        "output": {"figures": False},
    })


def _run(
    config: ExperimentConfig, runs: bool, monkeypatch: pytest.MonkeyPatch
) -> dict[str, tuple[pd.DataFrame, pd.DataFrame]]:
    monkeypatch.setattr(Replica, "decode_runs", runs)
    # the oracle's two ways (the engine's decode runs route ahead only: test_compiled_engine holds it to these)
    setup = prepare(config)
    out = {}
    for label, entry, policy in setup.policies:
        requests, iterations, _ = oracle_run(setup, entry, policy)
        out[label] = (requests, iterations)
    return out


STATISTICAL = {"routing_mode": "statistical", "statistical_cache": False, "statistical_samples": 8}


@pytest.mark.parametrize(
    ("parallelism", "serving", "simulation"),
    [({}, {}, {}), ({}, {"chunked_prefill": False}, {}), ({}, {"gpu_memory_utilization": 0.64}, {}),
     ({"tensor_parallel": 2, "expert_parallel": 2}, {}, {}), ({}, {"gpu_memory_utilization": 0.64}, STATISTICAL)],
    ids=["chunked", "no-chunking", "small-kv-cache", "ep2", "statistical"],
)
def test_decode_runs_change_no_number(
    parallelism: dict, serving: dict, simulation: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Also in the statistical mode: its iterations draw from their instance's stream in order, whether a
    decode run draws several at once or not."""
    config = _config(parallelism, simulation, **serving)
    stepped = _run(config, False, monkeypatch)
    batched = _run(config, True, monkeypatch)
    for label in stepped:
        requests_a, iterations_a = stepped[label]
        requests_b, iterations_b = batched[label]
        assert len(iterations_a) == len(iterations_b) and len(requests_a) == len(requests_b)
        for frame_a, frame_b in ((requests_a, requests_b), (iterations_a, iterations_b)):
            for column in frame_a.columns:
                a, b = frame_a[column].to_numpy(), frame_b[column].to_numpy()
                if a.dtype == object and len(a) and isinstance(a[0], np.ndarray):
                    assert all(np.allclose(x, y) for x, y in zip(a, b, strict=True)), column
                elif np.issubdtype(a.dtype, np.floating):
                    assert np.allclose(a, b, rtol=1e-12, atol=1e-12, equal_nan=True), column
                else:
                    assert (a == b).all(), column


def test_kv_horizon_by_hand() -> None:
    # two requests holding 2 blocks of 4 tokens each, at 7 and 8 cached tokens: iteration j grows them to 8 + j
    # and 9 + j tokens; j=0: 8 -> 2 blocks, 9 -> 3 (1 new); j=1..3: 3 and 3 (2 new); j=4: 12 -> 3, 13 -> 4 (3 new)
    grown = grown_blocks(4, np.array([7, 8]), np.array([2, 2]), 6)
    assert grown.tolist() == [1, 2, 2, 2, 3, 4]
    assert fitting_iterations(grown, 2) == 4  # 2 free blocks
    assert fitting_iterations(grown[:3], 2) == 3


def test_routing_a_prefill_until_its_top_k_union_fills_changes_no_number(monkeypatch: pytest.MonkeyPatch) -> None:
    """A mixed iteration under top-k is routed in growing chunks from 4 tokens (2 assignments per expert) until
    every layer's union of experts is full; the distinct experts and assignments, hence every latency, equal
    routing all its tokens."""
    import lynxsim.engine.routing_step as replica

    config = _config()
    frames = {}
    for per_expert in (2, 10**9):
        monkeypatch.setattr(replica, "SATURATION_TOKENS_PER_EXPERT", per_expert)
        frames[per_expert] = _run(config, True, monkeypatch)
    for label in frames[2]:
        early, full = frames[2][label][1], frames[10**9][label][1]
        assert (early["prefill_tokens"] > 16).sum() > 10  # the early exit had work to do
        assert np.array_equal(early["latency_s"].to_numpy(), full["latency_s"].to_numpy())
        assert np.array_equal(np.stack(early["distinct_experts"]), np.stack(full["distinct_experts"]))
