"""A run's Chrome trace: valid trace event format, and the same iterations, requests and busy time as the records."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from lynxsim.cli import main
from lynxsim.config import validate_experiment
from lynxsim.errors import InputError
from lynxsim.runner import run_experiment
from lynxsim.timeline import REQUESTS_PID, write_traces


def _run(out: Path, **changes: Any) -> Path:
    data: dict[str, Any] = {
        "name": "timeline", "model": "mixtral-8x7b", "hardware": "h200",
        "workload": {"arrival": {"kind": "poisson", "rate_per_s": 6.0},
                     "prompt_tokens": {"kind": "task", "name": "gsm8k"},
                     "output_tokens": {"kind": "lognormal", "median_tokens": 40, "sigma": 0.5, "max_tokens": 200}},
        "serving": {"max_num_seqs": 16},
        "policies": [{"name": "topk"}, {"name": "lynx"}],
        "simulation": {"seed": 2, "num_requests": 80, "routing_mode": "statistical", "cutoff_s": 12.0},
        "output": {"dir": str(out), "figures": False},
        **changes,
    }
    run_experiment(validate_experiment(data), out)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("timeline")
    return {
        "colocated": _run(base / "colocated"),
        "disaggregated_tp2": _run(base / "disaggregated", deployment={
            "mode": "disaggregated", "prefill_instances": 1, "decode_instances": 2,
            "parallelism": {"tensor_parallel": 2}}),
    }


def _check_format(events: list[dict[str, Any]]) -> None:
    """The trace event format's rules this writer relies on."""
    open_async: dict[tuple[str, int], list[str]] = defaultdict(list)
    last_end: dict[tuple[int, int], float] = {}
    for event in events:
        assert event["ph"] in ("M", "X", "C", "b", "e") and isinstance(event["ts"], (int, float))
        if event["ph"] == "X":
            assert event["dur"] >= 0
            track = (event["pid"], event["tid"])
            assert event["ts"] >= last_end.get(track, 0.0) - 1e-3, "slices of one track overlap"
            last_end[track] = event["ts"] + event["dur"]
        elif event["ph"] == "C":
            assert all(value >= 0 for value in event["args"].values())
        elif event["ph"] == "b":
            open_async[(event["cat"], event["id"])].append(event["name"])
        elif event["ph"] == "e":
            stack = open_async[(event["cat"], event["id"])]
            assert stack and stack.pop() == event["name"], "an async end without its begin"
    assert not any(open_async.values()), "async slices never ended"
    assert [e["ts"] for e in events] == sorted(e["ts"] for e in events)


@pytest.mark.parametrize("layout", ["colocated", "disaggregated_tp2"])
def test_the_trace_is_valid_and_holds_what_the_records_hold(runs: dict[str, Path], layout: str) -> None:
    run_dir = runs[layout]
    written = write_traces(run_dir)
    assert [w.path.name for w in written] == ["topk.trace.json", "lynx.trace.json"]
    for trace in written:
        document = json.loads(trace.path.read_text())
        events = document["traceEvents"]
        _check_format(events)
        assert document["otherData"]["kept"] == "everything" and trace.events == len(events)
        label = trace.path.name.removesuffix(".trace.json")
        iterations = pd.read_parquet(run_dir / "policies" / label / "iterations.parquet")
        requests = pd.read_parquet(run_dir / "policies" / label / "requests.parquet")
        slices = pd.DataFrame([e for e in events if e["ph"] == "X"])
        ranks = 2 if layout == "disaggregated_tp2" else 1
        assert sorted(slices["tid"].unique()) == list(range(ranks))
        for instance, mine in iterations.groupby("instance"):
            for rank in range(ranks):
                track = slices[(slices["pid"] == instance) & (slices["tid"] == rank)]
                assert len(track) == len(mine)  # every iteration, on every rank
                assert track["dur"].sum() == pytest.approx(mine["latency_s"].sum() * 1e6, rel=1e-6)  # busy time
        outer = [e for e in events if e["ph"] == "b" and e["name"].startswith("request ")]
        assert len(outer) == len(requests) and {e["pid"] for e in outer} == {REQUESTS_PID}
        phases = {e["name"] for e in events if e["ph"] == "b" and not e["name"].startswith("request ")}
        assert {"queued", "prefill", "decode"} <= phases
        if layout == "disaggregated_tp2":
            assert "KV transfer" in phases
        counters = [e for e in events if e["ph"] == "C" and e["name"] == "requests"]
        finished_at_end = counters[-1]["args"]
        assert finished_at_end["running"] + finished_at_end["waiting"] <= (requests["status"] != "finished").sum()


def test_a_trace_over_its_budget_samples_requests_then_cuts_the_window(runs: dict[str, Path], tmp_path: Path) -> None:
    written = write_traces(runs["colocated"], tmp_path, max_events=1000)
    document = json.loads(written[0].path.read_text())
    assert len(document["traceEvents"]) <= 1000
    _check_format(document["traceEvents"])
    assert "window cut at" in document["otherData"]["kept"]
    window = write_traces(runs["colocated"], tmp_path / "w", window_s=(2.0, 4.0))
    events = json.loads(window[0].path.read_text())["traceEvents"]
    iteration_starts = [e["ts"] for e in events if e["ph"] == "X"]
    assert iteration_starts and min(iteration_starts) >= 1.5e6 and max(iteration_starts) < 4e6
    others = [e["ts"] for e in events if e["ph"] in ("b", "e", "C") and e["name"] != "KV cache used %"]
    assert min(others) >= 2e6 and max(others) <= 4e6  # requests and their counters cut to the window
    assert window[0].notes == ("window 2 to 4 s",)


def test_bad_input_is_one_line(tmp_path: Path, runs: dict[str, Path]) -> None:
    with pytest.raises(InputError, match="not a run directory"):
        write_traces(tmp_path)
    with pytest.raises(InputError, match="start must be before its end"):
        write_traces(runs["colocated"], tmp_path, window_s=(3.0, 1.0))
    assert main(["trace", str(tmp_path)]) == 2


def test_run_writes_traces_with_its_records(tmp_path: Path) -> None:
    out = tmp_path / "run"
    experiment = Path(__file__).resolve().parent.parent / "experiments" / "quickstart.yaml"
    code = main(["run", str(experiment), "--out", str(out), "--no-figures", "--trace",
                 "--set", "simulation.num_requests=30", "--set", "simulation.routing_mode=statistical"])
    assert code == 0
    assert sorted(p.name for p in (out / "trace").iterdir()) == ["lynx.trace.json", "topk.trace.json"]
