"""``lynxsim report``: the quick report end to end (CI's run of it), and the pieces with hand-worked numbers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from lynxsim.cli import main
from lynxsim.errors import InputError
from lynxsim.report.agreement import Comparison, _speedup_range, _verdict, agreement_table, load_published
from lynxsim.report.build import build_report
from lynxsim.report.figures import FigureData, capacity_at, draw
from lynxsim.sections.report import ReportSection

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "experiments" / "paper"
PUBLISHED = ROOT / "docs" / "results" / "paper_published.yaml"
QUALITY = ROOT / "docs" / "quality.csv"


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report")
    report = build_report(
        PAPER, out, out / "work", quick=True, workers=2, published_path=PUBLISHED, quality_path=QUALITY
    )
    failures = {
        s.stem: (s.error, s.sweep_report.failures) for s in report.sections if s.error or s.sweep_report.failures
    }
    assert not failures
    return out


def test_quick_report_draws_every_experiment_with_its_numbers(quick_report: Path) -> None:
    stems = [p.stem for p in sorted(PAPER.glob("*.yaml"))]
    readme = (quick_report / "README.md").read_text()
    for stem in stems:
        assert (quick_report / f"{stem}.png").stat().st_size > 10_000
        table = pd.read_csv(quick_report / f"{stem}.csv")
        assert len(table) > 0
        assert f"({stem}.png)" in readme
    assert readme.count("\n## ") == len(stems) + 1  # one section per experiment, then the agreement
    # every section states its routing evidence; a catalog model with a profile is routed by it by default
    assert readme.count("Routing evidence (") == len(stems)
    assert "qwen3-30b-a3b: Qwen3-30B-A3B's profile: fitted to real routing statistics" in readme


def test_quick_report_numbers_behave(quick_report: Path) -> None:
    experts = pd.read_csv(quick_report / "01_experts_vs_batch.csv")
    topk = experts[experts["policy"] == "topk"]
    lynx = experts[experts["policy"] == "lynx"].set_index(["model", "routing", "serving.max_num_seqs"])
    # batch 1: a token uses exactly its top-k experts, under either policy
    single = topk[topk["serving.max_num_seqs"] == 1]
    assert set(single["mean_distinct_experts"].round(6)) == {2.0, 8.0}
    # lynx never reads more experts than top-k in the same batch
    paired = topk.set_index(["model", "routing", "serving.max_num_seqs"])["mean_distinct_experts"]
    assert (lynx["mean_distinct_experts"] <= paired.loc[lynx.index] + 1e-9).all()
    tpot = pd.read_csv(quick_report / "03_tpot_max_batch_16.csv")
    assert (tpot["median_speedup"] > 1).all()
    policies = pd.read_csv(quick_report / "08_policies.csv").set_index("policy")
    assert policies.loc["topk", "measured_delta_loss_nats"] == 0  # the trained model's own baseline
    assert policies.loc["lynx", "measured_delta_loss_nats"] > 0
    assert policies.loc["lynx", "trained_model"] == "qwen2moe-like"
    overhead = pd.read_csv(quick_report / "10_host_overhead.csv")
    for _, line in overhead.groupby("model"):
        line = line.sort_values("overhead_ms")
        assert line["median_speedup"].iloc[0] == pytest.approx(line["diluted_speedup"].iloc[0])
        assert line["median_speedup"].iloc[-1] < line["median_speedup"].iloc[0]  # overhead dilutes Lynx's gain
        assert (line["tpot_p50_ms"].diff().dropna() > 0).all()
    agreement = pd.read_csv(quick_report / "agreement.csv")
    # the paper publishes no number per model (docs/results/paper_published.yaml): no row can say it agrees
    assert len(agreement) >= 3 and agreement["agrees"].str.startswith("not comparable: ").all()


def test_capacity_interpolates_at_the_crossing() -> None:
    rates = np.array([1.0, 2.0, 3.0, 4.0])
    tpot = np.array([10.0, 15.0, 25.0, 40.0])
    delay = np.zeros(4)
    assert capacity_at(rates, tpot, delay, 20.0) == pytest.approx(2.5)  # halfway from 15 to 25 ms
    assert capacity_at(rates, tpot, delay, 50.0) == 4.0  # every swept rate meets it
    assert capacity_at(rates, tpot, delay, 5.0) == 0.0  # even the lowest misses
    overloaded = np.array([0.0, 0.0, 9.0, 9.0])
    assert capacity_at(rates, tpot, overloaded, 30.0) == 2.0  # a queue that grows stops it at the last good rate


def test_speedup_vs_overhead_with_hand_worked_numbers(tmp_path: Path) -> None:
    key = "hardware.overrides.efficiency.iteration_overhead_s"
    results = pd.DataFrame({  # two runs, at 0 and 1 ms of host overhead, each with top-k and Lynx
        "config_hash": ["a", "a", "b", "b"], key: [0.0, 0.0, 0.001, 0.001], "model": ["m"] * 4,
        "policy": ["topk", "lynx"] * 2, "policy_position": [0, 1] * 2,
        "tpot_p50_ms": [10.0, 8.0, 11.0, 9.5], "tpot_mean_ms": [10.0, 8.0, 12.0, 10.0],
        "mean_decode_batch": [16.0, 12.0, 16.0, 13.0], "mean_distinct_experts": [60.0, 30.0, 60.0, 32.0],
    })
    section = ReportSection(title="t", figure="speedup_vs_overhead", x=key, lines=["model"])
    table = draw(FigureData(results, None, section, {}), tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 10_000 and (tmp_path / "f.csv").is_file()
    assert table["overhead_ms"].tolist() == [0.0, 1.0]
    assert table["median_speedup"].tolist() == pytest.approx([10 / 8, 11 / 9.5])
    assert table["mean_speedup"].tolist() == pytest.approx([10 / 8, 12 / 10])
    # 1 ms added to both of the first run's medians: (10 + 1) / (8 + 1); Lynx's batch grew, so it measured less
    assert table["diluted_speedup"].tolist() == pytest.approx([10 / 8, 11 / 9])
    assert table["decode_batch"].tolist() == [12.0, 13.0] and table["distinct_experts"].tolist() == [30.0, 32.0]


def test_verdicts_against_a_published_range() -> None:
    assert _verdict([1.09, 1.30], 1.12, 1.25) == "yes"
    assert _verdict([1.09, 1.30], 1.20, 1.60) == "partly"
    assert _verdict([1.09, 1.30], 1.60, 1.90) == "no (higher)"
    assert _verdict([1.09, 1.30], 0.80, 0.90) == "no (lower)"
    assert _verdict([1.30], 1.35, 1.40) == "yes"  # within 10% of a single figure


def test_agreement_rows_only_where_both_sides_exist() -> None:
    published = load_published(PUBLISHED)
    assert published is not None and "v3-abstract-throughput" in published
    table = pd.DataFrame({"deployment.mode": ["colocated", "disaggregated"], "median_speedup": [1.1, 1.5]})
    rows = agreement_table(published, {"03_tpot_max_batch_16": table})
    assert list(rows["lynxsim"]) == ["1.10x", "1.50x"]
    # a range over the paper's models, and a range of another deployment: shown, not judged
    assert list(rows["agrees"]) == [
        "not comparable: the paper gives a range or bound over its models, no number per model",
        "not comparable: the published range is the co-located one, the only one available here"]
    assert agreement_table(None, {"03_tpot_max_batch_16": table}).empty


def test_a_per_model_number_is_judged_per_model() -> None:
    published = {  # the paper's number for two models, in the section's setting
        "a": {"id": "a", "version": "v9", "where": "Table 9", "source_kind": "primary", "metric": "speed-up",
              "value": 1.20, "model_key": "mixtral-8x7b"},
        "b": {"id": "b", "version": "v9", "where": "Table 9", "source_kind": "primary", "metric": "speed-up",
              "value": 1.50, "model_key": "qwen3-30b-a3b"},
    }
    comparison = Comparison("median TPOT speed-up", ("a", "b"), "s", _speedup_range("median_speedup"), "why")
    table = pd.DataFrame({"model": ["mixtral-8x7b", "qwen3-30b-a3b", "olmoe-1b-7b"],
                          "median_speedup": [1.25, 1.10, 1.40]})
    rows = agreement_table(published, {"s": table}, (comparison,))
    assert list(rows["claim"]) == ["median TPOT speed-up: mixtral-8x7b", "median TPOT speed-up: qwen3-30b-a3b"]
    assert list(rows["agrees"]) == ["yes", "no (lower)"]  # 1.25 within 10% of 1.20; 1.10 below 1.50 - 10%


def test_report_of_a_folder_with_a_plain_experiment_is_exit_code_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = yaml.safe_load((PAPER / "06_expert_parallel.yaml").read_text())
    del raw["report"]
    (tmp_path / "x.yaml").write_text(yaml.safe_dump(raw))
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "out"), "--quick"]) == 2
    assert "has no 'report' section" in capsys.readouterr().err


def test_labels_need_one_per_value(tmp_path: Path) -> None:
    raw = yaml.safe_load((PAPER / "06_expert_parallel.yaml").read_text())
    raw["report"]["labels"] = {"deployment.parallelism": ["EP2"]}
    (tmp_path / "x.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(InputError, match="report.labels.deployment.parallelism"):
        build_report(tmp_path, tmp_path / "out", tmp_path / "work", quick=True, workers=1, published_path=PUBLISHED)
