"""SLO attainment and goodput by hand, and the capacity search's bracket."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from lynxsim.capacity import find_capacity, with_arrival_rate
from lynxsim.config import validate_experiment
from lynxsim.errors import InputError
from lynxsim.metrics import slo_met, summarize


def requests_table() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "arrival_s": [0.0, 1.0, 2.0, 3.0, 4.0],
            "status": ["finished", "finished", "finished", "finished", "cutoff_waiting"],
            "ttft_s": [0.1, 0.5, 0.1, 0.1, np.nan],
            "tpot_s": [0.02, 0.02, 0.03, np.nan, np.nan],
            "e2e_s": [1.0, 1.0, 1.0, 0.1, np.nan],
            "preemptions": [0, 0, 0, 0, 0],
            "scheduling_delay_s": [0.0, 0.2, 0.0, 0.0, np.nan],
            "prompt_tokens": [10, 10, 10, 10, 10],
            "cached_tokens": [0, 0, 0, 0, 0],
        }
    )


def test_slo_met_by_hand() -> None:
    table = requests_table()
    # request 1 misses TTFT, request 2 misses TPOT, request 3 has one output token (no TPOT), request 4 unfinished
    assert slo_met(table, ttft_slo_s=0.2, tpot_slo_s=0.025).tolist() == [True, False, False, True, False]
    assert slo_met(table, ttft_slo_s=None, tpot_slo_s=None).tolist() == [True, True, True, True, False]


def test_attainment_goodput_and_scheduling_delay_by_hand() -> None:
    iterations = pd.DataFrame(columns=["start_s", "sampled_tokens", "pure_decode", "mean_distinct_experts",
                                       "policy_applied", "prefill_tokens", "decode_tokens"])
    summary = summarize(requests_table(), iterations, warmup_s=1.0, end_s=9.0, ttft_slo_s=0.2, tpot_slo_s=0.025)
    # after warm-up: requests 1..4, of which only 3 meets both targets; the window is 8 s
    assert summary["slo_attainment"] == 0.25
    assert summary["goodput_rps"] == 1 / 8
    assert math.isinf(summary["scheduling_delay_p99_s"])  # request 4 was never scheduled


CAPACITY = {
    "name": "cap",
    "model": "mixtral-8x7b",
    "hardware": "h200",
    "workload": {
        "arrival": {"kind": "poisson", "rate_per_s": 4.0},
        "prompt_tokens": {"kind": "fixed", "tokens": 64},
        "output_tokens": {"kind": "fixed", "tokens": 32},
    },
    "serving": {"max_num_seqs": 64},
    "policies": [{"name": "topk"}, {"name": "lynx"}],
    "simulation": {"seed": 0, "duration_s": 6.0, "warmup_s": 1.0},
    "slo": {"tpot_s": 0.025, "attainment": 0.9},
}


def test_capacity_bisection_brackets_the_boundary() -> None:
    config = validate_experiment(CAPACITY)
    result = find_capacity(config, 0, rel_tolerance=0.05)
    assert result.rate_per_s > 0 and result.at_capacity is not None and result.at_capacity.meets_slo
    failing = [p.rate_per_s for p in result.probes if not p.meets_slo]
    assert failing, "the search must have found a rate that misses"
    nearest_miss = min(r for r in failing if r > result.rate_per_s)
    assert nearest_miss / result.rate_per_s - 1 <= 0.05 + 1e-9
    lynx = find_capacity(config, 1, rel_tolerance=0.05)
    assert lynx.rate_per_s >= result.rate_per_s * 0.95  # reading fewer experts never lowers capacity much


def test_capacity_needs_a_duration_and_a_target() -> None:
    by_count = {**CAPACITY, "simulation": {"seed": 0, "num_requests": 50}}
    with pytest.raises(InputError, match="simulation.duration_s"):
        find_capacity(validate_experiment(by_count), 0)
    with pytest.raises(InputError, match="slo"):
        find_capacity(validate_experiment({**CAPACITY, "slo": {}}), 0)


def test_with_arrival_rate_changes_only_the_rate() -> None:
    config = validate_experiment(CAPACITY)
    changed = with_arrival_rate(config, 9.5)
    assert changed.workload.arrival.rate_per_s == 9.5  # type: ignore[union-attr]
    assert changed.workload.prompt_tokens == config.workload.prompt_tokens
    listed = validate_experiment(
        {**CAPACITY, "workload": {**CAPACITY["workload"], "arrival": {"kind": "list", "times_s": [0.0]}}}
    )
    with pytest.raises(InputError, match="workload.arrival.kind"):
        with_arrival_rate(listed, 2.0)
