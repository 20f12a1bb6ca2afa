"""Whole runs: determinism, paired comparison, the run directory, and the CLI commands around it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from lynxsim.cli import main
from lynxsim.config import validate_experiment
from lynxsim.plots import FIGURE_NAMES
from lynxsim.runner import run_experiment

SMALL = {
    "name": "small",
    "model": "qwen3-30b-a3b",
    "hardware": "h200",
    "workload": {
        "arrival": {"kind": "poisson", "rate_per_s": 8.0},
        "prompt_tokens": {"kind": "uniform", "low_tokens": 16, "high_tokens": 200},
        "output_tokens": {"kind": "uniform", "low_tokens": 4, "high_tokens": 40},
    },
    "serving": {"max_num_seqs": 32, "max_num_batched_tokens": 512},
    "policies": [{"name": "topk"}, {"name": "lynx"}],
    "simulation": {"seed": 7, "num_requests": 40, "warmup_s": 0.5},
}


def run_small(tmp_path: Path | None = None, **changes: object) -> object:
    config = validate_experiment({**SMALL, **changes})
    return run_experiment(config, tmp_path)


def test_same_seed_same_numbers() -> None:
    first, second = run_small(), run_small()
    for a, b in zip(first.runs, second.runs, strict=True):  # type: ignore[attr-defined]
        pd.testing.assert_frame_equal(a.requests, b.requests)
        pd.testing.assert_frame_equal(a.iterations, b.iterations)


def test_other_seed_other_numbers() -> None:
    first = run_small()
    other = run_small(simulation={**SMALL["simulation"], "seed": 8})  # type: ignore[dict-item]
    assert not first.runs[0].requests["arrival_s"].equals(other.runs[0].requests["arrival_s"])  # type: ignore[attr-defined]


def test_policies_see_the_same_requests_and_lynx_reads_fewer_experts() -> None:
    result = run_small()
    topk, lynx = result.runs  # type: ignore[attr-defined]
    cols = ["request_id", "arrival_s", "prompt_tokens", "output_tokens"]
    pd.testing.assert_frame_equal(topk.requests[cols], lynx.requests[cols])
    assert (topk.requests["status"] == "finished").all() and (lynx.requests["status"] == "finished").all()
    assert lynx.summary["mean_distinct_experts"] < topk.summary["mean_distinct_experts"]
    assert lynx.summary["retained_mass"] < 1.0 == topk.summary["retained_mass"]
    # prefill iterations run plain top-k under decode_only
    mixed = lynx.iterations[~lynx.iterations["pure_decode"]]
    assert not mixed["policy_applied"].any() and (mixed["mean_retained_mass"] == 1.0).all()


def test_progress_follows_arrivals_and_leaves_the_numbers_alone() -> None:
    calls: list[tuple[str, int, int]] = []
    config = validate_experiment(SMALL)
    watched = run_experiment(config, on_arrivals=lambda label, arrived, total: calls.append((label, arrived, total)))
    for label in ("topk", "lynx"):
        counts = [arrived for name, arrived, total in calls if name == label]
        assert counts[0] == 0 and counts[-1] == 40 and counts == sorted(counts)
        assert {total for name, _, total in calls if name == label} == {40}
    plain = run_small()
    for a, b in zip(watched.runs, plain.runs, strict=True):  # type: ignore[attr-defined]
        pd.testing.assert_frame_equal(a.iterations, b.iterations)


def test_apply_to_all_changes_prefill_iterations() -> None:
    result = run_small(policies=[{"name": "topk"}, {"name": "lynx", "apply_to": "all"}])
    mixed = result.runs[1].iterations[~result.runs[1].iterations["pure_decode"]]  # type: ignore[attr-defined]
    assert mixed["policy_applied"].all() and (mixed["mean_retained_mass"] < 1.0).any()


def test_summary_ratios_against_first_policy() -> None:
    frame = run_small().summary_frame()  # type: ignore[attr-defined]
    assert frame.loc["topk", "tpot_p50_ms_ratio"] == 1.0
    assert frame.loc["lynx", "tpot_p50_ms_ratio"] == pytest.approx(
        frame.loc["lynx", "tpot_p50_ms"] / frame.loc["topk", "tpot_p50_ms"]
    )


def test_cli_run_writes_records_and_figures(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(SMALL))
    out = tmp_path / "run"
    assert main(["run", str(path), "--out", str(out), "--set", "simulation.num_requests=15"]) == 0
    printed = capsys.readouterr().out
    assert "TPOT p50" in printed and "ratio to topk" in printed and "SLO met" not in printed  # SMALL has no SLO
    summary = json.loads((out / "summary.json").read_text())
    # Qwen3-30B-A3B on the H200: the shipped profile holds its measured kernel tables
    assert summary["policies"] == ["topk", "lynx"] and summary["cost_model"] == "measured"
    requests = pd.read_parquet(out / "policies" / "lynx" / "requests.parquet")
    assert len(requests) == 15
    iterations = pd.read_parquet(out / "policies" / "lynx" / "iterations.parquet")
    assert len(iterations["distinct_experts"].iloc[0]) == 48  # one entry per MoE layer of Qwen3-30B-A3B
    figures = sorted(p.name for p in (out / "figures").glob("*.png"))
    assert figures == sorted(FIGURE_NAMES)
    layers = pd.read_parquet(out / "policies" / "lynx" / "layers.parquet")
    assert len(layers) == 48 and (layers["retained_mass"] <= 1.0).all()
    for figure in figures:
        (out / "figures" / figure).unlink()
    assert main(["plot", str(out)]) == 0
    assert len(list((out / "figures").glob("*.png"))) == len(FIGURE_NAMES)


def test_cli_listings(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models"]) == 0
    assert "deepseek-v3" in capsys.readouterr().out
    assert main(["hardware"]) == 0
    assert "h200" in capsys.readouterr().out


def test_plot_of_missing_run_is_an_input_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plot", str(tmp_path / "nothing")]) == 2
    assert "summary.json" in capsys.readouterr().err


def test_python_dash_m_entry_point() -> None:
    done = subprocess.run([sys.executable, "-m", "lynxsim", "--version"], capture_output=True, text=True, check=True)
    assert done.stdout.startswith("lynxsim ")


def test_the_command_exits_without_collecting_what_it_built(monkeypatch: pytest.MonkeyPatch) -> None:
    """``console_main`` (the ``lynxsim`` command) returns ``main``'s code with what exists frozen out of the
    collector, so that the interpreter's exit does not free numba's objects one by one."""
    import gc

    from lynxsim import cli

    monkeypatch.setattr(cli, "main", lambda: 3)
    gc.unfreeze()
    try:
        assert cli.console_main() == 3
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


def test_measured_tables_can_be_switched_off_for_the_roofline() -> None:
    from lynxsim.runner import prepare

    measured = prepare(validate_experiment(SMALL))
    roofline = prepare(validate_experiment({**SMALL, "hardware": {"profile": "h200", "measured_tables": False}}))
    assert measured.cost_model.source == "measured" and roofline.cost_model.source == "roofline"
    assert not roofline.hardware.measured.tables and measured.hardware.measured.tables
