"""The pre-flight estimate (lynxsim.preflight): requests bounded by the cut-off, memory refused with the key to
change, wall time bounded from the measured speeds; and requests drawn only up to the cut-off."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from lynxsim.config import ExperimentConfig, load_experiment, validate_experiment
from lynxsim.errors import InputError
from lynxsim.models import load_catalog_model
from lynxsim.preflight import (
    BASE_BYTES,
    LOGITS_BYTES,
    REQUEST_BYTES,
    WALL_S_PER_OUTPUT_TOKEN_LAYER,
    check_fits,
    check_wall_time,
    estimate,
    expected_requests,
    wall_time_s,
)
from lynxsim.workload import generate_requests
from lynxsim.workload.arrivals import GammaArrivals, PoissonArrivals
from lynxsim.workload.lengths import FixedLength

QUICKSTART = Path(__file__).resolve().parents[1] / "experiments" / "quickstart.yaml"
MIXTRAL = load_catalog_model("mixtral-8x7b")


def quickstart(*overrides: str) -> ExperimentConfig:
    return load_experiment(QUICKSTART, list(overrides))


def test_requests_are_bounded_by_the_cut_off() -> None:
    assert expected_requests(quickstart()) == 600
    # 3 requests/s for 10 s: 30, plus ten standard deviations and 16
    assert expected_requests(quickstart("simulation.num_requests=100000000", "simulation.cutoff_s=10",
                                        "simulation.warmup_s=0")) == int(30 + 10 * math.sqrt(30) + 16)
    listed = quickstart("workload.arrival={kind: list, times_s: [0, 1, 2]}")
    assert expected_requests(listed) == 3


def test_memory_estimate_hand_worked() -> None:
    config = quickstart("serving.max_num_batched_tokens=1000")
    scratch = 32 * 1000 * 8 * LOGITS_BYTES  # layers x tokens x experts, float32, one instance
    assert estimate(config, MIXTRAL).peak_bytes == BASE_BYTES + scratch + 600 * 2 * REQUEST_BYTES
    statistical = quickstart("serving.max_num_batched_tokens=1000", "simulation.routing_mode=statistical")
    assert estimate(statistical, MIXTRAL).peak_bytes == BASE_BYTES + 600 * 2 * REQUEST_BYTES


def test_a_run_that_cannot_fit_is_refused_naming_the_key() -> None:
    with pytest.raises(InputError) as info:
        check_fits(quickstart("simulation.num_requests=10000000"), MIXTRAL, available=8 * 10**9)
    assert info.value.where == "simulation.num_requests" and "10,000,000 requests need about 41.4 GB" in str(info.value)
    with pytest.raises(InputError) as info:
        check_fits(quickstart("serving.max_num_batched_tokens=4000000"), MIXTRAL, available=2 * 10**9)
    assert info.value.where == "serving.max_num_batched_tokens"
    assert check_fits(quickstart(), MIXTRAL, available=8 * 10**9).requests == 600


def test_wall_time_bound_hand_worked_and_refused_past_the_limit() -> None:
    config = quickstart("workload.output_tokens={kind: fixed, tokens: 100}", "simulation.max_wall_s=100")
    requests = generate_requests(config.workload.arrival, config.workload.prompt_tokens, config.workload.output_tokens,
                                 seed=0, num_requests=600)
    expected_s = 600 * 100 * 2 * 32 * WALL_S_PER_OUTPUT_TOKEN_LAYER["exact"]  # tokens x policies x layers x 160 ns
    assert wall_time_s(config, MIXTRAL, requests) == pytest.approx(expected_s)
    assert check_wall_time(config, MIXTRAL, requests) == pytest.approx(expected_s)  # 0.6 s: under 100 s
    tight = quickstart("workload.output_tokens={kind: fixed, tokens: 100}", "simulation.max_wall_s=0.1")
    with pytest.raises(InputError) as info:
        check_wall_time(tight, MIXTRAL, requests)
    assert info.value.where == "simulation.num_requests" and "60,000 output tokens" in str(info.value)
    statistical = quickstart("workload.output_tokens={kind: fixed, tokens: 100}", "simulation.routing_mode=statistical")
    assert wall_time_s(statistical, MIXTRAL, requests) == pytest.approx(expected_s / 16)


def test_a_cut_off_run_draws_the_same_requests_fewer_of_them() -> None:
    lengths = FixedLength(tokens=4)
    for arrival in (PoissonArrivals(rate_per_s=5.0), GammaArrivals(rate_per_s=5.0, cv=3.0)):
        full = generate_requests(arrival, lengths, lengths, seed=3, num_requests=5000)
        cut = generate_requests(arrival, lengths, lengths, seed=3, num_requests=5000, until_s=60.0)
        assert cut == [r for r in full if r.arrival_s < 60.0] and 0 < len(cut) < len(full)
        by_time = generate_requests(arrival, lengths, lengths, seed=3, duration_s=900.0, until_s=60.0)
        assert by_time == cut


def test_an_enormous_request_count_with_an_early_cut_off_is_cheap() -> None:
    requests = generate_requests(PoissonArrivals(rate_per_s=3.0), FixedLength(tokens=4), FixedLength(tokens=4),
                                 seed=0, num_requests=10**8, until_s=1.0)
    assert len(requests) < 20 and all(r.arrival_s < 1.0 for r in requests)
    times = np.array([r.arrival_s for r in requests])
    assert (np.diff(times) > 0).all()


def test_a_config_from_no_file_has_no_place_to_name() -> None:
    config = validate_experiment({"model": "mixtral-8x7b", "hardware": "h200", "policies": [{"name": "topk"}],
                                  "workload": {"arrival": {"kind": "list", "times_s": [0.0]},
                                               "prompt_tokens": {"kind": "fixed", "tokens": 4},
                                               "output_tokens": {"kind": "fixed", "tokens": 4}}})
    assert config.locate("policies[0]: unknown") == "policies[0]: unknown"
