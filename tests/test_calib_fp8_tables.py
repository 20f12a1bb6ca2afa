"""FP8 expert tables in the cost model and the calibration commands (no torch): which table prices the experts
when ``expert_weight_dtype`` is fp8, the fallback where a profile has none, and the commands' options.

The shipped H200 profile holds ``mixtral-8x7b@fp8/moe`` and ``qwen3-30b-a3b@fp8/moe`` (measured on an H200,
2026-12-06); the tests read them where a shipped table is what they are about, and otherwise build profiles of
their own."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lynxsim.calib.commands import main
from lynxsim.calib.efficiency import model_for_key
from lynxsim.calib.plan import FP8_MOE_DESCRIPTION, plan_model
from lynxsim.cost import (
    CostModel,
    MeasuredCostModel,
    calibrated_shape_matches,
    expert_table_key,
    make_cost_model,
    table_name,
)
from lynxsim.datatypes import BatchShape
from lynxsim.hardware import KernelTable, load_hardware
from lynxsim.models import load_catalog_model
from lynxsim.models.spec import ModelSpec

H200 = load_hardware("h200")
MIXTRAL = load_catalog_model("mixtral-8x7b")


def with_experts(model: ModelSpec, dtype: str) -> ModelSpec:
    return ModelSpec.model_validate({**model.model_dump(), "expert_weight_dtype": dtype})


def decode(batch: int, context: int = 512) -> BatchShape:
    return BatchShape(decode_context_tokens=np.full(batch, context, dtype=np.int64),
                      prefill_chunk_tokens=np.zeros(0, dtype=np.int64),
                      prefill_context_tokens=np.zeros(0, dtype=np.int64))


def test_expert_table_key_names_the_quantized_variant():
    assert expert_table_key(MIXTRAL, "mixtral-8x7b") == "mixtral-8x7b"
    assert expert_table_key(with_experts(MIXTRAL, "bf16"), "mixtral-8x7b") == "mixtral-8x7b"
    assert expert_table_key(with_experts(MIXTRAL, "fp8"), "mixtral-8x7b") == "mixtral-8x7b@fp8"
    gpt_oss = load_catalog_model("gpt-oss-120b")  # its catalog experts are MXFP4: that is its own dtype
    assert expert_table_key(gpt_oss, "gpt-oss-120b") == "gpt-oss-120b"
    assert expert_table_key(with_experts(MIXTRAL, "fp8"), "not-a-catalog-key") == "not-a-catalog-key"


def test_an_explicit_bf16_override_keeps_the_calibrated_shape():
    assert calibrated_shape_matches(with_experts(MIXTRAL, "bf16"), "mixtral-8x7b")
    assert not calibrated_shape_matches(with_experts(MIXTRAL, "fp8"), "mixtral-8x7b")


def test_fp8_experts_are_priced_from_their_own_measured_table():
    """The shipped profile: FP8 Mixtral is measured, its MoE from ``mixtral-8x7b@fp8/moe`` and everything else
    from the bf16 tables, so only the MoE part of an iteration differs from bf16's."""
    fp8 = make_cost_model(with_experts(MIXTRAL, "fp8"), H200, "mixtral-8x7b")
    bf16 = make_cost_model(MIXTRAL, H200, "mixtral-8x7b")
    assert isinstance(fp8, MeasuredCostModel) and isinstance(bf16, MeasuredCostModel)
    assert fp8.moe_key == "mixtral-8x7b@fp8" and bf16.moe_key == "mixtral-8x7b"
    table = H200.measured.tables["mixtral-8x7b@fp8/moe"]
    width = len(table.axis_values[1])  # latency_s is row-major: tokens, then distinct experts
    tokens, distinct = table.axis_values[0][3], table.axis_values[1][-1]  # a grid point: exact
    assert fp8.units["moe"].scalar(tokens, distinct) == pytest.approx(table.latency_s[3 * width + width - 1])
    counts = np.zeros((MIXTRAL.num_moe_layers, MIXTRAL.num_experts), dtype=np.int64)
    counts[:, :4] = 4  # 8 tokens x top-2 over 4 experts in every layer
    a, b = fp8.iteration(decode(8), counts), bf16.iteration(decode(8), counts)
    assert a.attention_s == b.attention_s and a.dense_s == b.dense_s
    assert 0.4 * b.moe_s < a.moe_s < 0.8 * b.moe_s  # FP8 experts: half the bytes, measured 0.55-0.65x at 8 tokens


def test_fp8_without_its_table_falls_back_to_the_roofline():
    """A model whose FP8 experts have no table (OLMoE) is priced by the roofline, as any model without tables;
    so is FP8 Mixtral on a profile stripped of the FP8 tables."""
    olmoe = load_catalog_model("olmoe-1b-7b")
    assert type(make_cost_model(with_experts(olmoe, "fp8"), H200, "olmoe-1b-7b")) is CostModel
    tables = {n: t for n, t in H200.measured.tables.items() if not n.endswith("@fp8/moe")}
    stripped = H200.model_copy(update={"measured": H200.measured.model_copy(update={"tables": tables})})
    assert type(make_cost_model(with_experts(MIXTRAL, "fp8"), stripped, "mixtral-8x7b")) is CostModel
    # a quantized model that differs from the catalog in more than its experts is not the calibrated one
    other = ModelSpec.model_validate({**with_experts(MIXTRAL, "fp8").model_dump(), "top_k": 3})
    assert type(make_cost_model(other, H200, "mixtral-8x7b")) is CostModel


def test_measured_model_names_a_missing_fp8_table():
    with pytest.raises(ValueError, match=r"lacks measured tables olmoe-1b-7b@fp8/moe"):
        MeasuredCostModel(with_experts(load_catalog_model("olmoe-1b-7b"), "fp8"), H200, "olmoe-1b-7b",
                          moe_key="olmoe-1b-7b@fp8")


def test_fp8_plan_and_efficiency_key():
    fp8 = with_experts(MIXTRAL, "fp8")
    moe = next(p for p in plan_model("mixtral-8x7b@fp8", fp8) if p.unit == "moe")
    assert moe.name == "mixtral-8x7b@fp8/moe" and moe.description == FP8_MOE_DESCRIPTION
    assert model_for_key("mixtral-8x7b@fp8").expert_bytes * 2 == MIXTRAL.expert_bytes


def test_calibrate_fp8_dry_run_writes_only_the_moe_table(tmp_path: Path):
    out = tmp_path / "tables"
    assert main(["calibrate", "--models", "mixtral-8x7b", "--expert-dtype", "fp8", "--dry-run",
                 "--tables-out", str(out)]) == 0
    from lynxsim.calib.profile_io import read_table_file

    key, _, tables = read_table_file(out / "mixtral-8x7b@fp8.yaml")
    assert key == "mixtral-8x7b@fp8" and list(tables) == [table_name("mixtral-8x7b@fp8", "moe")]
    roofline_bf16 = main(["calibrate", "--models", "mixtral-8x7b", "--dry-run", "--units", "moe",
                          "--tables-out", str(tmp_path / "bf16")])
    assert roofline_bf16 == 0
    _, _, bf16 = read_table_file(tmp_path / "bf16" / "mixtral-8x7b.yaml")
    fp8_table: KernelTable = tables["mixtral-8x7b@fp8/moe"]
    # the roofline of a memory-bound point halves with FP8 experts (its launch cost aside)
    assert fp8_table.latency_s[0] < 0.6 * bf16["mixtral-8x7b/moe"].latency_s[0]


@pytest.mark.parametrize("extra, key", [
    (["--units", "dense_layer"], "--units"),
    (["--tensor-parallel", "2"], "--expert-dtype"),
    (["--expert-parallel", "2"], "--expert-dtype"),
])
def test_calibrate_fp8_refuses_what_it_does_not_measure(extra, key, capsys):
    assert main(["calibrate", "--models", "mixtral-8x7b", "--expert-dtype", "fp8", "--dry-run", *extra]) == 2
    assert key in capsys.readouterr().err


def test_experts_in_a_dtype_no_kernel_runs_are_refused(capsys):
    """gpt-oss-120b's experts are MXFP4, which no calibration kernel runs: refused in one line, not timed as bf16."""
    assert main(["calibrate", "--models", "gpt-oss-120b", "--dry-run"]) == 2
    assert "gpt-oss-120b's routed experts are mxfp4" in capsys.readouterr().err
