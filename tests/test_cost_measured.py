"""The measured cost model: log-space interpolation of kernel tables (hand examples, exactness at grid points,
monotonicity), roofline-scaled extrapolation, per-layer MoE pricing, and the choice between measured and roofline."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from lynxsim.calib.plan import plan_model, roofline_tables
from lynxsim.calib.profile_io import write_model_tables
from lynxsim.cost import (
    MEASURED_UNITS,
    CostModel,
    MeasuredCostModel,
    TableInterpolator,
    UnitRooflines,
    make_cost_model,
    required_units,
    table_name,
)
from lynxsim.datatypes import BatchShape
from lynxsim.hardware import (
    SHIPPED_PROFILE_DIR,
    CalibrationMetadata,
    HardwareProfile,
    KernelTable,
    load_hardware,
)
from lynxsim.models import load_catalog_model

H200 = load_hardware("h200")
OLMOE = load_catalog_model("olmoe-1b-7b")
META = CalibrationMetadata(gpu_name="NVIDIA H200", torch_version="2.11.0", cuda_version="13.0", date="2026-11-28")


def _table(axis_values: list[list[float]], latency: list, axes: tuple[str, ...] | None = None) -> KernelTable:
    axes = axes or tuple(f"a{i}" for i in range(len(axis_values)))
    return KernelTable(axes=axes, axis_values=axis_values, latency_s=latency)


# ----- hand-worked interpolation --------------------------------------------------------------------------------


def test_power_law_between_grid_points_is_exact() -> None:
    """log-log interpolation follows t = c * x**p exactly: [1, 4] -> [1e-4, 4e-4] (t ∝ x) gives 2e-4 at x = 2."""
    f = TableInterpolator(_table([[1, 4]], [1e-4, 4e-4]))
    assert f.scalar(2) == pytest.approx(2e-4, rel=1e-12)
    assert f.scalar(1) == pytest.approx(1e-4, rel=1e-12) and f.scalar(4) == pytest.approx(4e-4, rel=1e-12)
    flat = TableInterpolator(_table([[1, 4]], [3e-5, 3e-5]))
    assert flat.scalar(2.5) == pytest.approx(3e-5, rel=1e-12)


def test_axis_starting_at_zero_uses_log1p() -> None:
    """Axis [0, 3] maps to log(1 + x) = [0, log 4]; x = 1 is halfway (log 2), so the value is the geometric
    mean of 1e-5 and 4e-5: 2e-5."""
    f = TableInterpolator(_table([[0, 3]], [1e-5, 4e-5]))
    assert f.scalar(1) == pytest.approx(2e-5, rel=1e-12)
    assert f.scalar(0) == pytest.approx(1e-5, rel=1e-12)


def test_bilinear_in_log_space_hand_example() -> None:
    """t = x * y * 1e-6 on [1, 2] x [1, 2]: at (sqrt 2, sqrt 2) both weights are 1/2, and the mean of the four
    log values is log(2e-6): exact for this power law."""
    f = TableInterpolator(_table([[1, 2], [1, 2]], [[1e-6, 2e-6], [2e-6, 4e-6]]))
    r = math.sqrt(2)
    assert f.scalar(r, r) == pytest.approx(2e-6, rel=1e-12)
    assert f.scalar(r, 1) == pytest.approx(r * 1e-6, rel=1e-12)
    assert f(np.array([r, 1.0]), np.array([r, 2.0])) == pytest.approx([2e-6, 2e-6], rel=1e-12)


def test_single_point_axis() -> None:
    f = TableInterpolator(_table([[1]], [7e-6]))
    assert f.scalar(1) == pytest.approx(7e-6, rel=1e-12)
    assert f.scalar(5) == pytest.approx(7e-6, rel=1e-12)  # no roofline: clamped
    g = TableInterpolator(_table([[1], [4, 16]], [[1e-5, 4e-5]]))
    assert g.scalar(1, 8) == pytest.approx(2e-5, rel=1e-12)


def test_extrapolation_scales_the_edge_by_the_roofline() -> None:
    """Above the grid: T(edge) * R(x) / R(edge). R = 1e-6 + 1e-7 x, edge x = 8 (t = 2e-6): at x = 18,
    2e-6 * (2.8e-6 / 1.8e-6). Below the grid the same rule applies with the lower edge."""
    def roofline(x: np.ndarray) -> np.ndarray:
        return 1e-6 + 1e-7 * np.asarray(x, dtype=float)

    f = TableInterpolator(_table([[2, 8]], [1e-6, 2e-6]), roofline)
    assert f.scalar(18) == pytest.approx(2e-6 * 2.8e-6 / 1.8e-6, rel=1e-12)
    assert f.scalar(1) == pytest.approx(1e-6 * 1.1e-6 / 1.2e-6, rel=1e-12)
    assert f(np.array([18.0, 1.0, 8.0])) == pytest.approx([2e-6 * 2.8 / 1.8, 1e-6 * 1.1 / 1.2, 2e-6], rel=1e-12)
    assert f.scalar(8) == pytest.approx(2e-6, rel=1e-12)  # inside: no scaling


# ----- properties -------------------------------------------------------------------------------------------------

_axis = st.lists(st.integers(1, 4096), min_size=1, max_size=6, unique=True).map(sorted)


@st.composite
def _monotone_table(draw: st.DrawFn) -> tuple[KernelTable, list[list[int]]]:
    a = draw(_axis)
    b = draw(st.lists(st.integers(0, 4096), min_size=1, max_size=5, unique=True).map(sorted))
    increments = draw(st.lists(st.floats(0.0, 1e-4), min_size=len(a) * len(b), max_size=len(a) * len(b)))
    base = draw(st.floats(1e-7, 1e-3))
    inc = np.asarray(increments).reshape(len(a), len(b))
    values = base + np.cumsum(np.cumsum(inc, axis=0), axis=1)  # non-decreasing along both axes
    return _table([a, b], values.tolist()), [a, b]


@settings(max_examples=60, deadline=None)
@given(_monotone_table())
def test_exact_at_every_grid_point(drawn: tuple[KernelTable, list[list[int]]]) -> None:
    table, (a, b) = drawn
    f = TableInterpolator(table)
    values = np.asarray(table.latency_s).reshape(len(a), len(b))
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            assert f.scalar(x, y) == pytest.approx(values[i, j], rel=1e-9)
    grid_x, grid_y = np.meshgrid(a, b, indexing="ij")
    assert f(grid_x, grid_y) == pytest.approx(values, rel=1e-9)


@settings(max_examples=60, deadline=None)
@given(_monotone_table(), st.data())
def test_monotone_where_the_table_is(drawn: tuple[KernelTable, list[list[int]]], data: st.DataObject) -> None:
    table, _ = drawn
    f = TableInterpolator(table)
    y = data.draw(st.floats(0, 5000))
    x1, x2 = sorted(data.draw(st.lists(st.floats(0.5, 5000), min_size=2, max_size=2)))
    assert f.scalar(x1, y) <= f.scalar(x2, y) * (1 + 1e-12)
    x = data.draw(st.floats(0.5, 5000))
    y1, y2 = sorted(data.draw(st.lists(st.floats(0, 5000), min_size=2, max_size=2)))
    assert f.scalar(x, y1) <= f.scalar(x, y2) * (1 + 1e-12)
    # the vectorized path agrees with the scalar one
    assert f(np.array([x1, x2]), np.array([y, y])) == pytest.approx([f.scalar(x1, y), f.scalar(x2, y)], rel=1e-9)


# ----- the measured cost model -------------------------------------------------------------------------------------


def _profile_with_tables(model_key: str, model, grid: str = "default") -> HardwareProfile:
    tables = roofline_tables(plan_model(model_key, model, grid), model, H200)
    measured = {"metadata": META.model_dump(), "tables": {k: v.model_dump() for k, v in tables.items()}}
    return HardwareProfile.model_validate({**H200.model_dump(exclude={"measured"}), "measured": measured})


@pytest.fixture(scope="module")
def olmoe_measured() -> MeasuredCostModel:
    model = make_cost_model(OLMOE, _profile_with_tables("olmoe-1b-7b", OLMOE), "olmoe-1b-7b")
    assert isinstance(model, MeasuredCostModel)
    return model


def test_units_and_axes_are_documented() -> None:
    assert set(required_units(OLMOE)) == set(MEASURED_UNITS) - {"dense_ffn_layer", "graph_launch"}
    ds = load_catalog_model("deepseek-v2-lite")
    assert "dense_ffn_layer" in required_units(ds)
    assert table_name("olmoe-1b-7b", "moe") == "olmoe-1b-7b/moe"
    with pytest.raises(ValueError):
        table_name("olmoe-1b-7b", "nope")


def test_each_moe_layer_is_priced_at_its_own_distinct_experts(olmoe_measured: MeasuredCostModel) -> None:
    """Half the layers at 8 distinct experts and half at 40 cost the sum of the two table entries, not twice
    the entry at the mean 24 (the curve is not linear in log space)."""
    layers, experts = OLMOE.num_moe_layers, OLMOE.num_experts
    tokens = 16
    counts = np.zeros((layers, experts), dtype=np.int64)
    for layer in range(layers):
        distinct = 8 if layer % 2 == 0 else 40
        ids = np.arange(tokens * OLMOE.top_k) % distinct
        counts[layer] = np.bincount(ids, minlength=experts)
    moe = olmoe_measured.units["moe"]
    expected = layers // 2 * (moe.scalar(tokens, 8) + moe.scalar(tokens, 40))
    assert olmoe_measured.moe_time_s(counts) == pytest.approx(expected, rel=1e-12)
    assert olmoe_measured.per_layer_moe_s(counts).sum() == pytest.approx(expected, rel=1e-9)
    # unequal assignment totals (a dropping policy) take the vectorized path, same answer per layer
    counts[0, 0] -= 1
    assert olmoe_measured.moe_time_s(counts) == pytest.approx(olmoe_measured.per_layer_moe_s(counts).sum(), rel=1e-9)


def test_iteration_is_the_sum_of_units(olmoe_measured: MeasuredCostModel) -> None:
    """Mixed iteration: 2 decode rows (contexts 100, 300), one prefill chunk of 64 after 256 cached tokens."""
    m = olmoe_measured
    u = m.units
    batch = BatchShape(prefill_chunk_tokens=[64], prefill_context_tokens=[256], decode_context_tokens=[100, 300])
    counts = np.zeros((OLMOE.num_moe_layers, OLMOE.num_experts), dtype=np.int64)
    counts[:, :OLMOE.top_k] = 66
    latency = m.iteration(batch, counts)
    layers = OLMOE.num_layers
    attention = layers * (u["attention_decode"].scalar(2, 200) + u["attention_prefill"].scalar(64, 256))
    dense = layers * u["dense_layer"].scalar(66) + u["embedding"].scalar(66) + u["lm_head"].scalar(3)
    moe = layers * u["moe"].scalar(66, OLMOE.top_k)
    assert latency.attention_s == pytest.approx(attention, rel=1e-12)
    assert latency.dense_s == pytest.approx(dense, rel=1e-12)
    assert latency.moe_s == pytest.approx(moe, rel=1e-12)
    assert latency.overhead_s == pytest.approx(u["graph_launch"].scalar(1) + H200.efficiency.iteration_overhead_s)
    assert m.gpu_time_s(latency) == pytest.approx(latency.total_s - H200.efficiency.iteration_overhead_s)


def test_tables_of_roofline_values_reproduce_the_unit_rooflines(olmoe_measured: MeasuredCostModel) -> None:
    """With tables holding the unit rooflines, a prediction at grid points equals the rooflines, and between
    them stays within a few percent (the interpolation's own error on a max(a, b x) + c curve)."""
    roof = UnitRooflines(OLMOE, H200)
    for unit in ("moe", "attention_decode", "dense_layer", "lm_head"):
        f, r = olmoe_measured.units[unit], roof.unit_roofline(unit)
        grid = [np.asarray(v, dtype=float) for v in f.table.axis_values]
        point = tuple(float(axis[len(axis) // 2]) for axis in grid)
        assert f.scalar(*point) == pytest.approx(float(r(*point)), rel=1e-9)
        between = tuple(float(np.sqrt(axis[len(axis) // 2] * axis[len(axis) // 2 + 1])) if axis.size > 1 else axis[0]
                        for axis in grid)
        assert f.scalar(*between) == pytest.approx(float(r(*between)), rel=0.06)


def test_extrapolation_beyond_the_largest_batch_follows_the_roofline(olmoe_measured: MeasuredCostModel) -> None:
    dense = olmoe_measured.units["dense_layer"]
    roof = UnitRooflines(OLMOE, H200).unit_roofline("dense_layer")
    top = dense.table.axis_values[0][-1]
    assert dense.scalar(4 * top) == pytest.approx(float(roof(4 * top)), rel=1e-9)  # roofline table: exact


def test_make_cost_model_picks_measured_only_with_tables_and_the_calibrated_shape() -> None:
    profile = _profile_with_tables("olmoe-1b-7b", OLMOE, grid="tiny")
    assert make_cost_model(OLMOE, profile, "olmoe-1b-7b").source == "measured"
    assert make_cost_model(OLMOE, profile, None).source == "roofline"
    assert make_cost_model(OLMOE, H200.model_copy(update={"measured": H200.measured.model_copy(update={"tables": {}})}),
                           "olmoe-1b-7b").source == "roofline"
    mixtral = load_catalog_model("mixtral-8x7b")
    assert make_cost_model(mixtral, profile, "mixtral-8x7b").source == "roofline"  # tables for another model only
    fp8 = OLMOE.model_copy(update={"weight_dtype": "fp8"})
    assert make_cost_model(fp8, profile, "olmoe-1b-7b").source == "roofline"  # another shape than calibrated
    tuned = OLMOE.model_copy(update={"lynx_alpha": 2.0, "lynx_beta": 1.0})
    assert make_cost_model(tuned, profile, "olmoe-1b-7b").source == "measured"  # lynx constants change no kernel
    partial = profile.measured.model_copy(
        update={"tables": {k: v for k, v in profile.measured.tables.items() if not k.endswith("/lm_head")}}
    )
    assert make_cost_model(OLMOE, profile.model_copy(update={"measured": partial}), "olmoe-1b-7b").source == "roofline"


def test_measured_model_rejects_wrong_axes() -> None:
    profile = _profile_with_tables("olmoe-1b-7b", OLMOE, grid="tiny")
    tables = dict(profile.measured.tables)
    tables["olmoe-1b-7b/lm_head"] = KernelTable(axes=("tokens",), axis_values=[[1, 2]], latency_s=[1e-5, 2e-5])
    bad = profile.model_copy(update={"measured": profile.measured.model_copy(update={"tables": tables})})
    with pytest.raises(ValueError, match="axes"):
        MeasuredCostModel(OLMOE, bad, "olmoe-1b-7b")


def test_run_reports_measured_cost_model(tmp_path: Path) -> None:
    """A run on a profile with the model's tables reports cost_model 'measured' in summary.json; the same run
    on the shipped profile's datasheet alone reports 'roofline'."""
    import json

    from lynxsim.config import ExperimentConfig
    from lynxsim.runner import run_experiment

    source = SHIPPED_PROFILE_DIR / "h200.yaml"
    profile = tmp_path / "gpu.yaml"
    text = source.read_text()
    data = yaml.safe_load(text)
    data["measured"] = {}
    profile.write_text(yaml.safe_dump(data))
    tables = roofline_tables(plan_model("olmoe-1b-7b", OLMOE, "tiny"), OLMOE, H200)
    write_model_tables(profile, "olmoe-1b-7b", tables, META)

    def config(hw: str) -> ExperimentConfig:
        return ExperimentConfig.model_validate({
            "model": "olmoe-1b-7b", "hardware": hw,
            "workload": {"arrival": {"kind": "list", "times_s": [0.0, 0.01, 0.02]},
                         "prompt_tokens": {"kind": "fixed", "tokens": 40},
                         "output_tokens": {"kind": "fixed", "tokens": 5}},
            "policies": [{"name": "topk"}],
            "output": {"figures": False},
        })

    measured = run_experiment(config(str(profile)), tmp_path / "measured")
    assert measured.setup.cost_model.source == "measured"
    assert json.loads((tmp_path / "measured" / "summary.json").read_text())["cost_model"] == "measured"
    roofline_profile = tmp_path / "plain.yaml"
    roofline_profile.write_text(yaml.safe_dump(data))
    roofline = run_experiment(config(str(roofline_profile)), tmp_path / "roofline")
    assert json.loads((tmp_path / "roofline" / "summary.json").read_text())["cost_model"] == "roofline"
    assert measured.runs[0].summary["requests_finished"] == 3
    assert isinstance(roofline.setup.cost_model, CostModel)
