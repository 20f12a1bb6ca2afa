"""The summary table `lynxsim run` prints: one layout whatever the number of policies, what a policy costs always
shown, SLO columns only with an SLO; and the warnings under it."""

from __future__ import annotations

import io
from pathlib import Path

import pandas as pd
import pytest
import yaml
from rich.console import Console

from lynxsim.cli import main, summary_table, summary_warnings
from lynxsim.summary_columns import SLO_COLUMNS, SUMMARY_COLUMNS

METRICS = {key: 1.0 for key, _, _ in SUMMARY_COLUMNS + SLO_COLUMNS}
COUNTS = {"requests_arrived": 10.0, "requests_finished": 10.0, "requests_rejected": 0.0, "requests_unfinished": 0.0,
          "requests_measured": 8.0}


def frame(policies: int, **changes: float) -> pd.DataFrame:
    rows = [{**METRICS, **COUNTS, **(changes if i == policies - 1 else {})} for i in range(policies)]
    return pd.DataFrame(rows, index=[f"p{i}" for i in range(policies)])


def headers(table_frame: pd.DataFrame, *, with_slo: bool) -> list[str]:
    return [str(column.header) for column in summary_table(table_frame, "t", with_slo=with_slo).columns]


@pytest.mark.parametrize("policies", [1, 2, 5, 20])
def test_one_layout_whatever_the_number_of_policies(policies: int) -> None:
    assert headers(frame(policies), with_slo=False) == headers(frame(2), with_slo=False)
    table = summary_table(frame(policies), "t", with_slo=False)
    assert table.row_count == policies
    for must_see in ("changed", "dropped", "mass", "requests"):
        assert must_see in headers(frame(policies), with_slo=False)


def test_slo_columns_only_with_an_slo() -> None:
    assert "SLO met" not in headers(frame(2), with_slo=False)
    assert headers(frame(2), with_slo=True)[-2:] == ["SLO met", "goodput"]


def test_request_counts_in_one_cell() -> None:
    console = Console(file=io.StringIO(), width=250)
    console.print(summary_table(frame(2, requests_finished=7.0, requests_rejected=2.0, requests_unfinished=1.0), "t",
                                with_slo=False))
    assert "7/2/1" in console.file.getvalue()  # type: ignore[attr-defined]


def test_warnings_name_rejected_unfinished_and_unmeasured() -> None:
    assert summary_warnings(frame(2)) == []
    warned = summary_warnings(frame(2, requests_rejected=3.0, requests_unfinished=2.0, requests_measured=0.0))
    assert len(warned) == 3 and all(w.startswith("p1: ") for w in warned)
    assert "3 of 10 requests rejected" in warned[0] and "2 of 10 requests unfinished" in warned[1]
    assert "no request measured" in warned[2]


def test_strict_turns_warnings_into_exit_code_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    experiment = {
        "model": "mixtral-8x7b", "hardware": "h200", "routing": {"kind": "synthetic"},
        "workload": {"arrival": {"kind": "poisson", "rate_per_s": 50.0},
                     "prompt_tokens": {"kind": "fixed", "tokens": 16},
                     "output_tokens": {"kind": "fixed", "tokens": 400}},
        "policies": [{"name": "topk"}], "simulation": {"num_requests": 20, "cutoff_s": 1.0},
        "output": {"figures": False},
    }
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(experiment))
    assert main(["run", str(path), "--out", str(tmp_path / "a")]) == 0
    assert "unfinished at the cut-off" in capsys.readouterr().out
    assert main(["run", str(path), "--out", str(tmp_path / "b"), "--strict"]) == 1
