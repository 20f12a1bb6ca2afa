"""The calibration and validation code that runs without a GPU or torch: sweep planning, table writing into a
profile, the iterations validation executes, the comparison statistics and report, and the command line's
dry runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from lynxsim.calib.compare import (
    MEDIAN_TARGET,
    P95_TARGET,
    error_summary,
    iterations_markdown,
    summary_markdown,
    with_errors,
    write_csv,
)
from lynxsim.calib.iterations import (
    RecordingCostModel,
    ValidationIteration,
    expert_assignment,
    load_iterations,
    save_iterations,
    select_iterations,
    simulate_and_record,
    validation_config,
)
from lynxsim.calib.plan import (
    distinct_expert_grid,
    even_assignment,
    feasible_tokens,
    plan_model,
    roofline_tables,
)
from lynxsim.calib.profile_io import (
    merge_table_files,
    read_table_file,
    replace_top_level_block,
    table_file_text,
    write_model_tables,
)
from lynxsim.cost import DIAGNOSTIC_UNITS, MEASURED_UNITS, CostModel, make_cost_model
from lynxsim.datatypes import BatchShape, LatencyBreakdown
from lynxsim.hardware import SHIPPED_PROFILE_DIR, CalibrationMetadata, load_hardware
from lynxsim.models import load_catalog_model

H200 = load_hardware("h200")
REPO = Path(__file__).resolve().parents[1]
META = CalibrationMetadata(gpu_name="NVIDIA H200", torch_version="2.11.0+cu130", cuda_version="13.0", date="2026-11-28")
KEYS = ("mixtral-8x7b", "qwen3-30b-a3b", "olmoe-1b-7b", "deepseek-v2-lite")


# ----- planning -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", KEYS)
def test_plan_covers_every_unit_with_valid_axes(key: str) -> None:
    model = load_catalog_model(key)
    plans = plan_model(key, model)
    units = {p.unit for p in plans}
    assert "moe" in units and "attention_decode" in units and "graph_launch" in units
    assert ("dense_ffn_layer" in units) == bool(model.num_dense_layers)
    for plan in plans:
        assert plan.name == f"{key}/{plan.unit}"
        assert plan.axes == {**MEASURED_UNITS, **DIAGNOSTIC_UNITS}[plan.unit]
        for values in plan.axis_values:
            assert list(values) == sorted(set(values))
        assert len(list(plan.points())) == plan.num_points
    moe = next(p for p in plans if p.unit == "moe")
    assert moe.axis_values[1][0] == model.top_k and moe.axis_values[1][-1] == model.num_experts
    assert 256 in moe.axis_values[0] and 2048 in moe.axis_values[0]
    decode = next(p for p in plans if p.unit == "attention_decode")
    assert decode.axis_values[0][0] == 1 and decode.axis_values[0][-1] == 256


def test_distinct_expert_grid() -> None:
    assert distinct_expert_grid(8, 2) == (2, 3, 4, 5, 6, 7, 8)
    assert distinct_expert_grid(64, 8) == (8, 12, 16, 24, 32, 36, 40, 44, 48, 52, 56, 60, 64)
    grid = distinct_expert_grid(128, 8)
    assert grid[0] == 8 and grid[-1] == 128 and 120 in grid and 72 in grid
    assert distinct_expert_grid(64, 8, "tiny") == (8, 36, 64)


def test_feasible_tokens_and_even_assignment() -> None:
    assert feasible_tokens(1, 64, 8) == 8 and feasible_tokens(16, 64, 8) == 16 and feasible_tokens(1, 2, 2) == 1
    ids = np.asarray(even_assignment(8, 64, 8))
    assert ids.shape == (8, 8)
    assert all(len(set(row)) == 8 for row in ids.tolist())  # a token's experts are distinct
    assert np.bincount(ids.ravel(), minlength=64).tolist() == [1] * 64
    ids = np.asarray(even_assignment(5, 3, 2))  # 10 assignments over 3 experts: 4, 3, 3
    assert sorted(np.bincount(ids.ravel()).tolist()) == [3, 3, 4]
    with pytest.raises(ValueError):
        even_assignment(1, 16, 8)
    with pytest.raises(ValueError):
        even_assignment(4, 4, 8)


def test_roofline_tables_follow_the_plan() -> None:
    model = load_catalog_model("mixtral-8x7b")
    plans = plan_model("mixtral-8x7b", model, "tiny")
    tables = roofline_tables(plans, model, H200)
    for plan in plans:
        assert tables[plan.name].shape == plan.shape
        assert all(v > 0 for v in tables[plan.name].latency_s)


# ----- table writing ------------------------------------------------------------------------------------------------


def _profile_copy(tmp_path: Path) -> Path:
    """The shipped H200 profile's text (comments included) without its measured tables."""
    path = tmp_path / "gpu.yaml"
    text = (SHIPPED_PROFILE_DIR / "h200.yaml").read_text()
    path.write_text(replace_top_level_block(text, "measured", "measured: {}\n"))
    return path


def _datasheet_part(text: str) -> str:
    return text[: text.index("\nmeasured:")]


def test_write_model_tables_keeps_the_datasheet_part_and_reads_back(tmp_path: Path) -> None:
    path = _profile_copy(tmp_path)
    before = path.read_text()
    tiny = {}
    for key in ("olmoe-1b-7b", "mixtral-8x7b"):
        model = load_catalog_model(key)
        tiny[key] = roofline_tables(plan_model(key, model, "tiny"), model, H200)
        written = write_model_tables(path, key, tiny[key], META)
        assert written == tmp_path / "gpu.tables" / f"{key}.yaml"
    after = path.read_text()
    assert _datasheet_part(after) == _datasheet_part(before)  # comments, figures and sources untouched
    profile = load_hardware(path)
    assert profile.measured.table_files == ("gpu.tables/mixtral-8x7b.yaml", "gpu.tables/olmoe-1b-7b.yaml")
    assert profile.measured.model_keys() == ["mixtral-8x7b", "olmoe-1b-7b"]
    assert profile.measured.metadata_for("olmoe-1b-7b/moe").gpu_name == "NVIDIA H200"
    for model_tables in tiny.values():
        for name, table in model_tables.items():
            read = profile.measured.tables[name]
            assert read.axes == table.axes and read.axis_values == table.axis_values
            assert np.allclose(read.latency_s, table.latency_s, rtol=1e-3)  # 4 significant digits
    # writing a model again replaces its tables and keeps one entry in table_files
    write_model_tables(path, "olmoe-1b-7b", tiny["olmoe-1b-7b"], META)
    again = load_hardware(path)
    assert again.measured.table_files == profile.measured.table_files
    assert path.read_text().count("\nmeasured:") == 1
    assert make_cost_model(load_catalog_model("olmoe-1b-7b"), again, "olmoe-1b-7b").source == "measured"


def test_write_rejects_foreign_tables_and_restores_on_failure(tmp_path: Path) -> None:
    path = _profile_copy(tmp_path)
    model = load_catalog_model("olmoe-1b-7b")
    tables = roofline_tables(plan_model("olmoe-1b-7b", model, "tiny"), model, H200)
    with pytest.raises(ValueError, match="do not belong"):
        write_model_tables(path, "mixtral-8x7b", tables, META)


def test_merge_table_files(tmp_path: Path) -> None:
    model = load_catalog_model("olmoe-1b-7b")
    tables = roofline_tables(plan_model("olmoe-1b-7b", model, "tiny"), model, H200)
    table_file = tmp_path / "brought_back" / "olmoe-1b-7b.yaml"
    table_file.parent.mkdir()
    table_file.write_text(table_file_text("olmoe-1b-7b", META, tables))
    key, metadata, read = read_table_file(table_file)
    assert key == "olmoe-1b-7b" and metadata == META and set(read) == set(tables)
    path = _profile_copy(tmp_path)
    merge_table_files(path, [table_file])
    assert load_hardware(path).measured.model_keys() == ["olmoe-1b-7b"]


def test_replace_top_level_block() -> None:
    text = "a: 1\n# about b\nb:\n  x: 1\n  y: 2\n# about c\nc: 3\n"
    assert replace_top_level_block(text, "b", "b: {}\n") == "a: 1\n# about b\nb: {}\n# about c\nc: 3\n"
    assert replace_top_level_block("a: 1\n", "m", "m: 2") == "a: 1\nm: 2\n"
    assert replace_top_level_block("a: 1\nm: {}\n", "m", "m:\n  k: 1\n") == "a: 1\nm:\n  k: 1\n"


def test_duplicate_table_between_inline_and_file_is_an_error(tmp_path: Path) -> None:
    from lynxsim.errors import InputError

    path = _profile_copy(tmp_path)
    model = load_catalog_model("olmoe-1b-7b")
    tables = roofline_tables(plan_model("olmoe-1b-7b", model, "tiny"), model, H200)
    write_model_tables(path, "olmoe-1b-7b", tables, META)
    data = yaml.safe_load(path.read_text())
    data["measured"]["tables"] = {"olmoe-1b-7b/moe": tables["olmoe-1b-7b/moe"].model_dump(mode="json")}
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(InputError, match="also in"):
        load_hardware(path)


# ----- iterations for validation -------------------------------------------------------------------------------------


def test_expert_assignment_reproduces_counts_with_distinct_experts_per_token() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        tokens, experts, k = int(rng.integers(1, 40)), int(rng.integers(8, 70)), int(rng.integers(1, 9))
        k = min(k, experts)
        ids = np.stack([rng.choice(experts, size=k, replace=False) for _ in range(tokens)])
        counts = np.bincount(ids.ravel(), minlength=experts)
        rebuilt = expert_assignment(counts, tokens, k)
        assert rebuilt.shape == (tokens, k) and rebuilt.dtype == np.int32
        assert np.array_equal(np.bincount(rebuilt.ravel(), minlength=experts), counts)
        assert all(len(set(row)) == k for row in rebuilt.tolist())
    with pytest.raises(ValueError, match="non-dropping"):
        expert_assignment(np.array([1, 0]), 2, 1)


class _Fixed(CostModel):
    def iteration_activity(self, batch, activity):
        return LatencyBreakdown(1e-3, 0.0, 0.0, 0.0, 0.0)


def test_recording_cost_model_keeps_the_engine_inputs() -> None:
    model = load_catalog_model("olmoe-1b-7b")
    recorder = RecordingCostModel(_Fixed(model, H200))
    shape = BatchShape(decode_context_tokens=[5, 7])
    counts = np.zeros((model.num_moe_layers, model.num_experts), dtype=np.int64)
    counts[:, :8] = 2
    assert recorder.iteration_activity(shape, recorder.activity(counts)).total_s == 1e-3
    assert recorder.records[0][0] is shape and recorder.records[0][1].dtype == np.int16
    assert np.array_equal(recorder.records[0][1], counts)
    assert recorder.model is model  # everything else is the wrapped model's


@pytest.fixture(scope="module")
def olmoe_recorded() -> dict[str, list[ValidationIteration]]:
    config = validation_config("olmoe-1b-7b", "h200", ["topk", "lynx"], requests=64)
    return simulate_and_record(config, "olmoe-1b-7b")


def test_simulated_iterations_cover_decode_batches_and_mixed(
    olmoe_recorded: dict[str, list[ValidationIteration]],
) -> None:
    assert set(olmoe_recorded) == {"topk", "lynx"}
    for label, iterations in olmoe_recorded.items():
        picked = select_iterations(iterations, batch_targets=(1, 2, 4, 8, 16, 32, 64), mixed=3)
        kinds = [it.kind for it in picked]
        assert kinds.count("mixed") == 3
        batches = sorted(it.shape.num_decode_tokens for it in picked if it.kind == "decode")
        assert batches[0] == 1 and batches[-1] >= 60
        assert [it.index for it in picked] == sorted(it.index for it in picked)
        for it in picked:
            assert it.expert_token_counts.shape == (16, 64)
            assert int(it.expert_token_counts.sum()) == it.shape.num_tokens * 8 * 16
            assert it.predicted_gpu_s == pytest.approx(it.predicted.total_s - H200.efficiency.iteration_overhead_s)
            row = it.row()
            assert row["policy"] == label and row["decode_batch"] == it.shape.num_decode_tokens
    # lynx activates fewer experts than top-k on the same decode batches
    topk = {it.index: it for it in olmoe_recorded["topk"] if it.kind == "decode"}
    lynx = [it for it in olmoe_recorded["lynx"] if it.kind == "decode" and it.index in topk
            and it.shape.num_decode_tokens == topk[it.index].shape.num_decode_tokens
            and it.shape.num_decode_tokens >= 8]
    assert lynx
    assert np.mean([(it.expert_token_counts > 0).sum() for it in lynx]) < np.mean(
        [(topk[it.index].expert_token_counts > 0).sum() for it in lynx])


def test_save_and_load_iterations(tmp_path: Path, olmoe_recorded: dict[str, list[ValidationIteration]]) -> None:
    picked = select_iterations(olmoe_recorded["lynx"], batch_targets=(1, 8, 32), mixed=2)
    path = save_iterations(tmp_path / "it.npz", picked)
    model = load_catalog_model("olmoe-1b-7b")
    loaded = load_iterations(path, {"olmoe-1b-7b": make_cost_model(model, H200, "olmoe-1b-7b")})
    assert len(loaded) == len(picked)
    for a, b in zip(picked, loaded, strict=True):
        assert (a.model_key, a.policy, a.index) == (b.model_key, b.policy, b.index)
        assert np.array_equal(a.shape.decode_context_tokens, b.shape.decode_context_tokens)
        assert np.array_equal(a.shape.prefill_chunk_tokens, b.shape.prefill_chunk_tokens)
        assert np.array_equal(a.expert_token_counts, b.expert_token_counts)
        assert b.predicted.total_s == pytest.approx(a.predicted.total_s)  # repriced by the same (roofline) model


# ----- comparison ---------------------------------------------------------------------------------------------------


def test_error_statistics_hand_example() -> None:
    """Errors +1%, -2%, +3.8%, +10% (mixtral topk) and 0%, 0% (olmoe lynx)."""
    rows = pd.DataFrame({
        "model": ["mixtral-8x7b"] * 4 + ["olmoe-1b-7b"] * 2,
        "policy": ["topk"] * 4 + ["lynx"] * 2,
        "kind": ["decode", "decode", "mixed", "decode", "decode", "decode"],
        "predicted_s": [1.01, 0.98, 1.038, 1.10, 2.0, 3.0],
        "measured_s": [1.0, 1.0, 1.0, 1.0, 2.0, 3.0],
    })
    summary = error_summary(with_errors(rows)).set_index(["model", "policy"])
    mixtral = summary.loc[("mixtral-8x7b", "topk")]
    assert mixtral["iterations"] == 4
    assert mixtral["median_abs_error"] == pytest.approx(0.029)  # median of 1, 2, 3.8, 10 %
    assert mixtral["p95_abs_error"] == pytest.approx(0.038 + 0.85 * 0.062)  # linear between 3.8% and 10%
    assert mixtral["worst_error"] == pytest.approx(0.10)
    assert mixtral["mean_error"] == pytest.approx(0.032)
    assert bool(mixtral["meets_median_target"]) and not bool(mixtral["meets_p95_target"])
    assert summary.loc[("olmoe-1b-7b", "lynx"), "median_abs_error"] == 0
    table = summary_markdown(summary.reset_index())
    assert "| mixtral-8x7b | topk | 4 | 2.9% | 9.1% | 10.0% | 3.2% | median only |" in table
    assert "predicted ms" in iterations_markdown(with_errors(rows))
    assert MEDIAN_TARGET == 0.03 and P95_TARGET == 0.08


def test_worst_error_keeps_its_sign_and_csv_round_trips(tmp_path: Path) -> None:
    rows = pd.DataFrame({"model": ["m"] * 3, "policy": ["p"] * 3, "kind": ["decode"] * 3,
                         "predicted_s": [0.5, 1.0, 1.1], "measured_s": [1.0, 1.0, 1.0]})
    summary = error_summary(rows)
    assert summary["worst_error"].iloc[0] == pytest.approx(-0.5)
    frame = pd.read_csv(write_csv(rows, tmp_path / "v.csv"))
    assert frame["error"].tolist() == pytest.approx([-0.5, 0.0, 0.1])
    with pytest.raises(ValueError, match="lack"):
        with_errors(rows.drop(columns=["kind"]))


# ----- command line (no GPU paths) -----------------------------------------------------------------------------------


def test_commands_module_does_not_import_torch() -> None:
    code = ("import sys, argparse; import lynxsim.calib.commands as c; p = argparse.ArgumentParser();"
            "s = p.add_subparsers(); c.add_calibrate_parser(s); c.add_validate_parser(s);"
            "import lynxsim.calib.plan, lynxsim.calib.profile_io, lynxsim.calib.compare, lynxsim.calib.iterations;"
            "import lynxsim.calib.report; assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_calibrate_dry_run_then_merge_then_validate_dry_run(tmp_path: Path) -> None:
    from lynxsim.calib.commands import main

    profile = _profile_copy(tmp_path)
    tables = tmp_path / "tables"
    assert main(["calibrate", "--models", "olmoe-1b-7b", "--grid", "default", "--dry-run",
                 "--tables-out", str(tables), "--profile", str(profile)]) == 0
    assert load_hardware(profile).measured.tables == {}  # a dry run never touches the profile
    assert main(["calibrate", "--merge", str(tables / "olmoe-1b-7b.yaml"), "--profile", str(profile)]) == 0
    assert load_hardware(profile).measured.model_keys() == ["olmoe-1b-7b"]
    record = tmp_path / "it.npz"
    assert main(["validate", "--models", "olmoe-1b-7b", "--profile", str(profile), "--record", str(record),
                 "--requests", "96"]) == 0
    out = tmp_path / "val"
    assert main(["validate", "--models", "olmoe-1b-7b", "--profile", str(profile), "--iterations", str(record),
                 "--dry-run", "--out", str(out)]) == 0
    frame = pd.read_csv(out / "validation.csv")
    assert set(frame["cost_model"]) == {"measured"}
    assert set(frame["policy"]) == {"topk", "lynx"}
    assert {"decode", "mixed"} <= set(frame["kind"])
    assert frame["decode_batch"].max() >= 90 and frame["decode_batch"].min() == 1
    # roofline tables predicting the roofline: only the interpolation error (and the graph-launch term) remains
    assert frame["abs_error"].median() < 0.03
    report = (out / "validation.md").read_text()
    assert "Dry run" in report and "| olmoe-1b-7b | topk |" in report
    # without --models the recorded file's models are validated (not the default list, which it lacks);
    # --stem names the two files and the report's link to its CSV
    named = tmp_path / "named"
    assert main(["validate", "--profile", str(profile), "--iterations", str(record), "--dry-run", "--out",
                 str(named), "--stem", "validation_olmoe"]) == 0
    assert pd.read_csv(named / "validation_olmoe.csv")["model"].unique().tolist() == ["olmoe-1b-7b"]
    assert "[validation_olmoe.csv](validation_olmoe.csv)" in (named / "validation_olmoe.md").read_text()
    # a model the file does not hold is an input error, before any work
    assert main(["validate", "--models", "mixtral-8x7b", "--profile", str(profile), "--iterations", str(record),
                 "--dry-run", "--out", str(named)]) == 2


def test_random_assignment_activates_exactly_the_distinct_experts() -> None:
    from lynxsim.calib.plan import random_assignment

    rng = np.random.default_rng(3)
    for tokens, distinct, k in [(1, 8, 8), (2, 16, 8), (64, 8, 2), (5, 40, 8), (256, 128, 8), (3, 6, 2), (100, 2, 2)]:
        ids = random_assignment(tokens, distinct, k, rng)
        assert ids.shape == (tokens, k)
        assert all(len(set(row)) == k for row in ids.tolist())
        counts = np.bincount(ids.ravel(), minlength=distinct)
        assert counts.size == distinct and (counts > 0).all()
    # uneven like a router's: at 64 tokens x top-2 over 8 experts the counts spread around 16
    counts = np.bincount(random_assignment(64, 8, 2, np.random.default_rng(0)).ravel())
    assert counts.min() < 16 < counts.max()
    with pytest.raises(ValueError):
        random_assignment(1, 16, 8, rng)


def test_calibrate_units_option_is_validated(tmp_path: Path) -> None:
    from lynxsim.calib.commands import main

    profile = _profile_copy(tmp_path)
    dry_run = ["calibrate", "--models", "olmoe-1b-7b", "--dry-run", "--profile", str(profile)]
    assert main([*dry_run, "--units", "nope"]) == 2
    assert main([*dry_run, "--units", "moe"]) == 0


def test_tensor_parallel_tables_then_validation_against_earlier_measurements(tmp_path: Path) -> None:
    """``--tensor-parallel 2``: calibration writes the shard's ``<key>@tp2`` tables, the instance cost model
    predicts from them plus the all-reduces, and ``--measured`` compares an earlier run's measurements with
    today's predictions without a GPU (the iterations are matched by model, policy and index)."""
    from lynxsim.calib.commands import main

    profile = _profile_copy(tmp_path)
    tables = tmp_path / "tables"
    assert main(["calibrate", "--models", "olmoe-1b-7b", "--tensor-parallel", "2", "--dry-run",
                 "--tables-out", str(tables), "--profile", str(profile)]) == 0
    assert main(["calibrate", "--merge", str(tables / "olmoe-1b-7b@tp2.yaml"), "--profile", str(profile)]) == 0
    assert load_hardware(profile).measured.model_keys() == ["olmoe-1b-7b@tp2"]
    record = tmp_path / "it.npz"
    common = ["--models", "olmoe-1b-7b", "--profile", str(profile), "--tensor-parallel", "2"]
    assert main(["validate", *common, "--record", str(record), "--requests", "64"]) == 0
    dry = tmp_path / "dry"
    assert main(["validate", *common, "--iterations", str(record), "--dry-run", "--out", str(dry)]) == 0
    frame = pd.read_csv(dry / "validation.csv")
    assert set(frame["cost_model"]) == {"measured (olmoe-1b-7b@tp2 tables)"}
    assert (frame["predicted_communication_s"] > 0).all()
    # the dry run's "measurements", each doubled, read back: every prediction is now half the measurement
    earlier = frame.assign(measured_s=2 * frame["measured_s"])
    earlier.to_csv(tmp_path / "earlier.csv", index=False)
    again = tmp_path / "again"
    assert main(["validate", *common, "--iterations", str(record), "--measured", str(tmp_path / "earlier.csv"),
                 "--out", str(again)]) == 0
    redone = pd.read_csv(again / "validation.csv")
    # (the CSV keeps 6 significant digits)
    assert redone["error"].to_numpy() == pytest.approx(frame["predicted_s"] / (2 * frame["measured_s"]) - 1, rel=1e-4)
    assert "Tensor parallelism (2 GPUs)" in (again / "validation.md").read_text()
    # a measurement file that lacks an iteration, or the environment columns, is an input error
    earlier.iloc[1:].to_csv(tmp_path / "short.csv", index=False)
    assert main(["validate", *common, "--iterations", str(record), "--measured", str(tmp_path / "short.csv")]) == 2
    earlier.drop(columns=["gpu_name"]).to_csv(tmp_path / "bare.csv", index=False)
    assert main(["validate", *common, "--iterations", str(record), "--measured", str(tmp_path / "bare.csv")]) == 2
    assert main(["calibrate", "--models", "olmoe-1b-7b", "--tensor-parallel", "3", "--dry-run"]) == 2
