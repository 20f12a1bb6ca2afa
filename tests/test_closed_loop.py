"""Closed-loop clients and batch jobs (workload.arrivals.ClosedLoopArrivals, BatchArrivals): each client has one
request in flight and sends the next when it ends, after its think time; a batch job sends everything at 0."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from lynxsim.config import validate_experiment
from lynxsim.errors import InputError
from lynxsim.runner import run_experiment

BASE: dict[str, Any] = {
    "model": "mixtral-8x7b",
    "hardware": "h200",
    "routing": {"kind": "synthetic"},
    "workload": {
        "arrival": {"kind": "closed_loop", "clients": 3},
        "prompt_tokens": {"kind": "uniform", "low_tokens": 8, "high_tokens": 64},
        "output_tokens": {"kind": "uniform", "low_tokens": 2, "high_tokens": 24},
    },
    "policies": [{"name": "topk"}],
    "simulation": {"seed": 1, "num_requests": 40},
    "output": {"figures": False},
}


def requests_of(changes: dict[str, Any] | None = None, **workload: Any) -> pd.DataFrame:
    data = {**BASE, **(changes or {}), "workload": {**BASE["workload"], **workload}}
    result = run_experiment(validate_experiment(data))
    return result.runs[0].requests


def in_flight_after_each_arrival(requests: pd.DataFrame) -> np.ndarray:
    arrival = requests["arrival_s"].to_numpy()
    end = requests["finish_s"].fillna(np.inf).to_numpy()
    return np.array([np.sum((arrival <= t) & (end > t)) for t in arrival])


def test_one_client_sends_each_request_a_think_time_after_the_last_one_ends() -> None:
    requests = requests_of(arrival={"kind": "closed_loop", "clients": 1, "think_time": {"mean_s": 0.25}})
    arrival, finish = requests["arrival_s"].to_numpy(), requests["finish_s"].to_numpy()
    assert arrival[0] == 0.0 and (requests["status"] == "finished").all()
    np.testing.assert_array_equal(arrival[1:], finish[:-1] + 0.25)  # the hand-worked rule, to the bit


@pytest.mark.parametrize("clients", [1, 3, 8])
def test_never_more_requests_in_flight_than_clients(clients: int) -> None:
    requests = requests_of(arrival={"kind": "closed_loop", "clients": clients})
    assert len(requests) == 40 and (requests["status"] == "finished").all()  # every request accounted for
    assert (requests["arrival_s"].to_numpy()[:clients] == 0.0).all()
    flight = in_flight_after_each_arrival(requests)
    assert flight.max() == clients
    # with no think time, every later send is a finish: the sends after the first are the earliest finishes
    later = np.sort(requests["arrival_s"].to_numpy()[clients:])
    np.testing.assert_array_equal(later, np.sort(requests["finish_s"].to_numpy())[: 40 - clients])


def test_exponential_think_times_are_deterministic_and_leave_lengths_alone() -> None:
    think = {"kind": "closed_loop", "clients": 2, "think_time": {"kind": "exponential", "mean_s": 0.5}}
    first, again = requests_of(arrival=think), requests_of(arrival=think)
    pd.testing.assert_frame_equal(first, again)
    zero = requests_of(arrival={"kind": "closed_loop", "clients": 2})
    np.testing.assert_array_equal(first["prompt_tokens"], zero["prompt_tokens"])
    assert (first["arrival_s"].to_numpy()[2:] > zero["arrival_s"].to_numpy()[2:]).mean() > 0.5


def test_a_rejected_request_frees_its_client_at_once() -> None:
    # every prompt is longer than a batch may hold without chunking: each is rejected as it arrives
    requests = requests_of({"serving": {"max_num_batched_tokens": 4, "chunked_prefill": False}},
                           arrival={"kind": "closed_loop", "clients": 1, "think_time": {"mean_s": 1.0}})
    assert (requests["status"] == "rejected_exceeds_max_num_batched_tokens").all()
    np.testing.assert_array_equal(requests["arrival_s"].to_numpy(), np.arange(40.0))


def test_sends_stop_at_the_duration_and_the_cut_off() -> None:
    requests = requests_of({"simulation": {"seed": 1, "num_requests": 40, "duration_s": 0.5}},
                           arrival={"kind": "closed_loop", "clients": 2})
    assert 2 <= len(requests) < 40 and (requests["arrival_s"] < 0.5).all()


def test_closed_loop_clients_behind_replicas() -> None:
    requests = requests_of({"deployment": {"replicas": 2, "router": "least_outstanding"}},
                           arrival={"kind": "closed_loop", "clients": 4})
    assert len(requests) == 40 and (requests["status"] == "finished").all()
    assert in_flight_after_each_arrival(requests).max() == 4
    assert set(requests["instance"]) == {0, 1}


def test_a_batch_job_sends_everything_at_once() -> None:
    requests = requests_of(arrival={"kind": "batch"})
    assert len(requests) == 40 and (requests["arrival_s"] == 0.0).all()


@pytest.mark.parametrize("kind", ["closed_loop", "batch"])
def test_closed_loop_and_batch_need_a_request_count(kind: str) -> None:
    arrival = {"kind": kind, "clients": 2} if kind == "closed_loop" else {"kind": kind}
    data = {**BASE, "workload": {**BASE["workload"], "arrival": arrival}, "simulation": {"duration_s": 5.0}}
    with pytest.raises(InputError, match="needs num_requests"):
        validate_experiment(data)


def test_the_experiment_file_runs(tmp_path: Path) -> None:
    from lynxsim.config import load_experiment

    path = Path(__file__).resolve().parents[1] / "experiments" / "closed_loop_clients.yaml"
    config = load_experiment(path, ["simulation.num_requests=24", "sweep=null"])
    result = run_experiment(config, tmp_path / "run")
    assert [run.label for run in result.runs] == ["topk", "lynx"]
    assert all(len(run.requests) == 24 for run in result.runs)


def test_closed_loop_clients_send_a_trace_s_recorded_lengths() -> None:
    from shared_data import REQUEST_TRACES

    trace = {"path": str(REQUEST_TRACES / "AzureLLMInferenceTrace_conv.csv"), "format": "azure"}
    data = {**BASE, "workload": {"arrival": {"kind": "closed_loop", "clients": 4}, "paired_lengths": trace},
            "simulation": {"seed": 1, "num_requests": 30}}
    requests = run_experiment(validate_experiment(data)).runs[0].requests
    assert len(requests) == 30 and in_flight_after_each_arrival(requests).max() == 4
    assert requests["prompt_tokens"].max() > 64  # the trace's lengths, not the base's uniform ones


def test_closed_loop_clients_of_a_disaggregated_deployment() -> None:
    requests = requests_of({"deployment": {"mode": "disaggregated", "prefill_instances": 1, "decode_instances": 1}},
                           arrival={"kind": "closed_loop", "clients": 3})
    assert len(requests) == 40 and (requests["status"] == "finished").all()
    assert in_flight_after_each_arrival(requests).max() == 3
    later = np.sort(requests["arrival_s"].to_numpy()[3:])  # each send is a finish on the decode instance
    np.testing.assert_array_equal(later, np.sort(requests["finish_s"].to_numpy())[:37])
