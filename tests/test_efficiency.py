"""Kernel efficiency (lynxsim/calib/efficiency.py) and the unit work it rests on (``UnitRooflines.unit_work``):
byte and FLOP counts worked by hand from the catalog shapes, the rooflines computed from the same work, and the
report on the committed profile's tables, written to hold for any calibrated profile rather than today's numbers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lynxsim.calib.efficiency import (
    AXIS_COLUMNS,
    UNITS,
    efficiency_markdown,
    efficiency_rows,
    efficiency_summary,
    model_for_key,
    write_efficiency,
)
from lynxsim.calib.plan import plan_model, roofline_tables
from lynxsim.calib.profile_io import replace_top_level_block, write_model_tables
from lynxsim.cost import (
    DIAGNOSTIC_UNITS,
    MEASURED_UNITS,
    CostModel,
    MeasuredCostModel,
    UnitRooflines,
    make_cost_model,
    required_units,
    table_name,
)
from lynxsim.datatypes import BatchShape, ExpertActivity
from lynxsim.hardware import SHIPPED_PROFILE_DIR, CalibrationMetadata, load_hardware
from lynxsim.models import load_catalog_model

PROFILE = SHIPPED_PROFILE_DIR / "h200.yaml"
H200 = load_hardware(PROFILE)
BANDWIDTH = 4.22e12
LAUNCH_S = 5.0e-6
META = CalibrationMetadata(gpu_name="NVIDIA H200", torch_version="2.11.0+cu130", cuda_version="13.0", date="2026-11-28")
MIXTRAL = load_catalog_model("mixtral-8x7b")
DS_LITE = load_catalog_model("deepseek-v2-lite")


@pytest.fixture(scope="module")
def committed_rows() -> pd.DataFrame:
    return efficiency_rows(H200)


# ----- unit work by hand ---------------------------------------------------------------------------------------------


def test_mixtral_dense_layer_gemms_work_by_hand() -> None:
    """Mixtral-8x7B (hidden 4096, 32 heads, 8 KV heads of 128, 8 experts), 16 tokens:
    QKV 4096 x (4096 + 2 x 1024) = 25,165,824 + output 4096 x 4096 = 16,777,216 + router 4096 x 8 = 32,768
    = 41,975,808 weights, 83,951,616 bytes; activations 16 x [(2 x 4096 + 32 x 128 + 32 x 128) x 2 + 2 x 8 x 128 x 2]
    = 16 x 36,864 = 589,824 bytes; FLOPs 2 x 41,975,808 x 16 = 1,343,225,856; 3 kernels (QKV, output, router)."""
    roof = UnitRooflines(MIXTRAL, H200)
    work_bytes, flops = roof.unit_work("dense_layer_gemms")(16)
    assert float(work_bytes) == 83_951_616 + 589_824
    assert float(flops) == 1_343_225_856
    assert roof.unit_kernels("dense_layer_gemms") == 3
    assert roof.unit_work("dense_layer")(16)[0] == work_bytes  # the same GEMMs, the same boundary
    # memory-bound at 16 rows: the roofline prices the weights alone, plus 3 launches
    expected_s = 83_951_616 / BANDWIDTH + 3 * LAUNCH_S
    assert float(roof.unit_roofline("dense_layer_gemms")(16)) == pytest.approx(expected_s, rel=1e-15)


def test_mixtral_moe_work_by_hand() -> None:
    """4 tokens over 3 experts: 3 x 3 x 4096 x 14336 x 2 B = 1,056,964,608 weight bytes, plus 2 x 4 x 4096 x 2 B
    = 65,536 of token rows in and out; FLOPs 2 x 176,160,768 x 4 tokens x top-2 = 2,818,572,288."""
    work_bytes, flops = UnitRooflines(MIXTRAL, H200).unit_work("moe")(4, 3)
    assert float(work_bytes) == 1_056_964_608 + 65_536
    assert float(flops) == 2_818_572_288


def test_gqa_attention_decode_work_by_hand() -> None:
    """Mixtral, 4 rows over 1024 KV entries: KV 4 x 1024 x (2 x 8 x 128 x 2 B) = 16,777,216 bytes, q in and output
    out 4 x 32 x (128 + 128) x 2 B = 65,536; FLOPs 4 x 1024 x 2 x 32 x (128 + 128) = 67,108,864."""
    roof = UnitRooflines(MIXTRAL, H200)
    work_bytes, flops = roof.unit_work("attention_decode")(4, 1024)
    assert float(work_bytes) == 16_777_216 + 65_536
    assert float(flops) == 67_108_864
    assert roof.unit_kernels("attention_decode") == 1


def test_mla_attention_work_by_hand() -> None:
    """DeepSeek-V2-Lite (16 heads, nope 128, rope 64, v 128, kv_lora_rank 512), absorbed decode of 2 rows over
    100 latents: latent 2 x 100 x 576 x 2 B = 230,400; kv_b weights 16 x 256 x 512 x 2 B = 4,194,304; q in and
    output out 2 x 16 x (192 + 128) x 2 B = 20,480. FLOPs: q_nope absorbed 2 x 2 x 16 x 128 x 512 = 4,194,304,
    latent attention 2 x 100 x 2 x 16 x (576 + 512) = 6,963,200, output un-absorbed 4,194,304; 3 kernels.
    Prefill of 16 tokens with no context: 16 latents decompressed, 2 x 16 x 512 x 16 x 256 = 67,108,864 FLOPs,
    plus 16 x 8.5 causal pairs x 2 x 16 x (192 + 128) = 1,392,640."""
    roof = UnitRooflines(DS_LITE, H200)
    work_bytes, flops = roof.unit_work("attention_decode")(2, 100)
    assert float(work_bytes) == 230_400 + 4_194_304 + 20_480
    assert float(flops) == 4_194_304 + 6_963_200 + 4_194_304
    assert roof.unit_kernels("attention_decode") == 3
    work_bytes, flops = roof.unit_work("attention_prefill")(16, 0)
    assert float(work_bytes) == 16 * 576 * 2 + 4_194_304 + 16 * 16 * 320 * 2
    assert float(flops) == 67_108_864 + 1_392_640
    assert roof.unit_kernels("attention_prefill") == 2


def test_mla_kv_b_weights_move_from_the_dense_layer_to_attention() -> None:
    """For MLA models the units read kv_b inside attention (as calibration's MLA kernels do), so dense_layer's
    weights plus the attention units' kv_b weights are exactly CostModel's non-expert weights of a MoE layer
    (projections, router, shared experts): moved, not lost or doubled. ``CostModel`` keeps pricing kv_b with
    the dense GEMMs (unchanged), so for MLA models the units no longer sum to its iteration roofline."""
    roof = UnitRooflines(DS_LITE, H200)
    attn = DS_LITE.attention
    kv_b_bytes = attn.num_heads * (attn.qk_nope_head_dim + attn.v_head_dim) * attn.kv_lora_rank * 2
    dense_streamed = float(roof.unit_work_parts("dense_layer")(1).streamed_bytes)
    decode_streamed = float(roof.unit_work_parts("attention_decode")(1, 1).streamed_bytes)
    assert decode_streamed - 576 * 2 == kv_b_bytes
    layer_params = DS_LITE.attention_params + DS_LITE.router_params + DS_LITE.shared_experts_params
    assert dense_streamed + kv_b_bytes == layer_params * 2
    # kv_a and the output projection stay (q has no low-rank path here): 2 + router 1 + shared experts 2
    assert roof.unit_kernels("dense_layer") == 1 + 2 + 1 + 2


# ----- the roofline is computed from the work ---------------------------------------------------------------------


@pytest.mark.parametrize("key", ["mixtral-8x7b", "qwen3-30b-a3b", "deepseek-v2-lite", "qwen2-57b-a14b@tp2",
                                 "deepseek-coder-v2@tp4"])
def test_roofline_is_the_max_of_the_work_over_the_ceilings_plus_launches(key: str) -> None:
    model = model_for_key(key)
    roof = UnitRooflines(model, H200)
    units = [*required_units(model), *DIAGNOSTIC_UNITS]
    for plan in plan_model(key, model, "tiny"):
        if plan.unit not in units:
            continue
        points = np.array(list(plan.points()), dtype=np.float64).T
        parts = roof.unit_work_parts(plan.unit)(*points)
        work_bytes, flops = roof.unit_work(plan.unit)(*points)
        assert np.array_equal(work_bytes, parts.streamed_bytes + parts.activation_bytes)
        assert np.array_equal(flops, parts.flops)
        expected = (np.maximum(parts.streamed_bytes / BANDWIDTH, flops / roof.unit_flops_per_s(plan.unit))
                    + roof.unit_kernels(plan.unit) * LAUNCH_S)
        assert np.array_equal(roof.unit_roofline(plan.unit)(*points), expected)
        assert (parts.activation_bytes > 0).all() and (parts.streamed_bytes > 0).all()


@pytest.mark.parametrize("key", ["mixtral-8x7b", "qwen3-30b-a3b", "olmoe-1b-7b", "qwen2-57b-a14b@tp2"])
def test_gqa_units_sum_to_the_cost_models_decode_iteration(key: str) -> None:
    """GQA models: a pure-decode iteration of B rows at one context C, tokens spread over d experts per layer,
    costs in CostModel exactly the units' rooflines summed (attention per layer, dense_layer per MoE layer, the
    LM head per sequence, the experts per MoE layer); only the embedding, which CostModel leaves out, is extra."""
    model = model_for_key(key)
    roof, cost = UnitRooflines(model, H200), CostModel(model, H200)
    batch, context, distinct = 24, 700, model.top_k + 1
    shape = BatchShape(decode_context_tokens=np.full(batch, context))
    layers = model.num_moe_layers
    activity = ExpertActivity(np.full(layers, distinct), np.full(layers, batch * model.top_k))
    assert cost.attention_time_s(shape) == pytest.approx(
        model.num_layers * float(roof.unit_roofline("attention_decode")(batch, context)), rel=1e-12)
    assert cost.dense_time_s(shape) == pytest.approx(
        model.num_moe_layers * float(roof.unit_roofline("dense_layer")(batch))
        + float(roof.unit_roofline("lm_head")(batch)), rel=1e-12)
    assert cost.moe_activity_s(activity) == pytest.approx(
        model.num_moe_layers * float(roof.unit_roofline("moe")(batch, distinct)), rel=1e-12)


def test_diagnostic_unit_is_planned_never_priced_and_loads(tmp_path: Path) -> None:
    """``dense_layer_gemms`` is in no cost model's required units, a table file holding it loads, and the
    measured cost model built on that profile reads no such unit."""
    assert "dense_layer_gemms" not in MEASURED_UNITS and "dense_layer_gemms" not in required_units(MIXTRAL)
    assert table_name("mixtral-8x7b", "dense_layer_gemms") == "mixtral-8x7b/dense_layer_gemms"
    path = tmp_path / "gpu.yaml"
    path.write_text(replace_top_level_block(PROFILE.read_text(), "measured", "measured: {}\n"))
    tables = roofline_tables(plan_model("mixtral-8x7b", MIXTRAL, "tiny"), MIXTRAL, H200)
    assert "mixtral-8x7b/dense_layer_gemms" in tables
    write_model_tables(path, "mixtral-8x7b", tables, META)
    profile = load_hardware(path)
    assert "mixtral-8x7b/dense_layer_gemms" in profile.measured.tables
    measured = make_cost_model(MIXTRAL, profile, "mixtral-8x7b")
    assert isinstance(measured, MeasuredCostModel) and "dense_layer_gemms" not in measured.units
    rows = efficiency_rows(profile, ["mixtral-8x7b"])
    gemms = rows[rows["unit"] == "dense_layer_gemms"].reset_index(drop=True)
    dense = rows[rows["unit"] == "dense_layer"].reset_index(drop=True)
    assert len(gemms) == len(dense) and np.array_equal(gemms["floor_s"], dense["floor_s"])


# ----- rows and report ----------------------------------------------------------------------------------------------


def test_model_for_key() -> None:
    assert model_for_key("mixtral-8x7b") == MIXTRAL
    assert model_for_key("qwen2-57b-a14b@tp2").attention.num_heads == 14
    assert model_for_key("mixtral-8x7b@ep2") == MIXTRAL  # an EP rank's experts are whole
    with pytest.raises(ValueError):
        model_for_key("mixtral-8x7b@xp2")


def test_rows_cover_every_table_of_the_profile(committed_rows: pd.DataFrame) -> None:
    tables = H200.measured.tables
    expected = {(name.split("/")[0], name.split("/")[1]) for name in tables if name.split("/")[1] in UNITS}
    assert set(zip(committed_rows["model"], committed_rows["unit"], strict=True)) == expected
    for (model, unit), group in committed_rows.groupby(["model", "unit"]):
        table = tables[table_name(model, unit)]
        assert len(group) == len(table.latency_s)
        assert np.array_equal(group["measured_s"], np.asarray(table.latency_s))
        for axis in AXIS_COLUMNS:
            assert group[axis].isna().all() == (axis not in table.axes)
    assert set(committed_rows["gpu"]) <= {H200.measured.metadata_for(n).gpu_name for n in tables}
    moe = committed_rows[committed_rows["unit"] == "moe"]
    assert (moe["timed_tokens"] >= moe["tokens"]).all()
    assert committed_rows.loc[committed_rows["unit"] != "moe", "timed_tokens"].isna().all()


def test_efficiency_of_the_committed_tables_is_sane(committed_rows: pd.DataFrame) -> None:
    """No measured time beats its floor by more than the ceilings' measurement margin: efficiency <= 1.3. The
    2026-11-28 tables peak at 1.05 (a Mixtral MoE point; the copy bandwidth's own cross-checks spread by 1.4%,
    and the MoE routing's token rows can stay in L2)."""
    rows = committed_rows
    assert (rows["efficiency"] > 0).all() and (rows["efficiency"] <= 1.3).all()
    assert np.array_equal(rows["floor_s"], np.maximum(rows["byte_floor_s"], rows["flop_floor_s"]))
    assert ((rows["bound"] == "bytes") == (rows["byte_floor_s"] >= rows["flop_floor_s"])).all()
    # a GEMM unit at one token streams its weights; a GQA decode row streams its KV cache
    assert set(rows.loc[(rows["unit"] == "dense_layer") & (rows["tokens"] == 1), "bound"]) == {"bytes"}
    gqa = [key for key in rows["model"].unique() if not model_for_key(key).attention.is_mla]
    assert set(rows.loc[(rows["unit"] == "attention_decode") & rows["model"].isin(gqa), "bound"]) == {"bytes"}


def test_summary_and_markdown_state_every_target(committed_rows: pd.DataFrame) -> None:
    summary = efficiency_summary(committed_rows)
    assert set(summary["region"]) == {"all", "decode"}
    moe = summary[(summary["unit"] == "moe") & (summary["region"] == "all")]
    assert (moe["bytes_dominated_points"] > 0).all()
    assert ((moe["min_bandwidth_fraction"] <= moe["median_bandwidth_fraction"])
            & (moe["share_at_bandwidth_target"].between(0, 1))).all()
    text = efficiency_markdown(committed_rows, summary, hardware=H200)
    for line in (
        "within 2x of `dense_layer_gemms`",
        "at most 45.0 us per layer for qwen3-30b-a3b and 70.0 us per layer for mixtral-8x7b",
        "at least 80% of the measured copy bandwidth wherever the active experts' bytes dominate",
        "byte floor is at least 4x both its FLOP floor and its kernels",
        "## Attention decode and LM head",
        "median of CUDA-graph replays",
        H200.sources["efficiency.sustained_bandwidth_bytes_per_s"],
        H200.sources["efficiency.flops_fraction"],
    ):
        assert line in text
    for model in committed_rows.loc[committed_rows["unit"] == "moe", "model"].unique():
        row = next(r for r in text.splitlines() if r.startswith(f"| {model} |") and "%" in r)
        assert row.endswith("| met |") or row.endswith("| NOT met |")
    for model in ("qwen3-30b-a3b", "mixtral-8x7b"):
        if (committed_rows["model"] == model).any():
            row = next(r for r in text.splitlines() if r.startswith(f"| {model} |"))
            assert ": met |" in row or ": NOT met |" in row


def test_write_efficiency(tmp_path: Path) -> None:
    csv_path, md_path = write_efficiency(PROFILE, ["olmoe-1b-7b"], tmp_path / "docs")
    rows = pd.read_csv(csv_path)
    assert set(rows["model"]) == {"olmoe-1b-7b"}
    assert {"measured_s", "bytes", "flops", "byte_floor_s", "flop_floor_s", "floor_s", "efficiency", "bound",
            "gpu", *AXIS_COLUMNS} <= set(rows.columns)
    assert md_path.read_text().startswith("# Kernel efficiency")


def test_expert_parallel_rank_table(tmp_path: Path) -> None:
    """An ``@ep<N>`` key's MoE table (E / N whole experts, from one active expert) is judged with the whole
    model's expert shapes, at the assignments calibration timed."""
    model = load_catalog_model("olmoe-1b-7b")
    tables = roofline_tables(plan_model("olmoe-1b-7b@ep2", model, "tiny", expert_parallel=2), model, H200)
    profile = H200.model_copy(update={"measured": H200.measured.model_copy(update={
        "tables": tables, "table_metadata": {name: META for name in tables}})})
    rows = efficiency_rows(profile, ["olmoe-1b-7b@ep2"])
    assert set(rows["unit"]) == {"moe"} and rows["distinct_experts"].min() == 1
    roof = UnitRooflines(model, H200)
    first = rows.iloc[0]
    assert first["bytes"] == float(roof.unit_work("moe")(first["timed_tokens"], first["distinct_experts"])[0])


def test_kernel_set_comparison_reads_both_sets_at_the_same_points() -> None:
    """A table set that is exactly twice another gives ratio 2 at every compared unit and count, and the
    MoE point is the typical distinct-expert count of that many tokens (Mixtral: 2 at 1 token, 8 at 64)."""
    from lynxsim.calib.efficiency import COMPARED_COUNTS, _typical_distinct, comparison_markdown, kernel_set_comparison
    from lynxsim.hardware import KernelTable, load_hardware

    hardware = load_hardware("h200")
    current = {n: t for n, t in hardware.measured.tables.items() if n.startswith("mixtral-8x7b/")}
    doubled = {n: KernelTable(description=t.description, axes=t.axes, axis_values=t.axis_values,
                              latency_s=tuple(2 * v for v in t.latency_s)) for n, t in current.items()}
    frame = kernel_set_comparison(doubled, current, lambda key: UnitRooflines(model_for_key(key), hardware))
    assert set(frame["unit"]) == {"dense_layer", "attention_decode", "moe", "lm_head"}
    assert len(frame) == 4 * len(COMPARED_COUNTS)
    assert np.allclose(frame["ratio"], 2.0)
    mixtral = model_for_key("mixtral-8x7b")
    assert _typical_distinct(mixtral, 1) == 2 and _typical_distinct(mixtral, 64) == 8
    assert "| mixtral-8x7b | moe |" in "\n".join(comparison_markdown(frame, "earlier"))
    same = kernel_set_comparison(current, current, lambda key: UnitRooflines(model_for_key(key), hardware))
    assert same.empty and comparison_markdown(same, "itself") == []  # the very same tables: no section
