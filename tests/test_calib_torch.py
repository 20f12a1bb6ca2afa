"""The torch side of calibration and validation: the timing harness, the sweeps and the validation executor.

On a CPU (torch installed, no GPU) they run on a tiny model shape as smoke tests of the code paths (no CUDA
graphs or events there; the MoE runs through the float32 reference). Tests marked ``gpu`` run the real
kernels, CUDA graphs and events and are skipped where no CUDA GPU is present."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from lynxsim.calib.iterations import ValidationIteration, expert_assignment
from lynxsim.calib.plan import plan_model
from lynxsim.cost import MeasuredCostModel
from lynxsim.datatypes import BatchShape, LatencyBreakdown
from lynxsim.hardware import SHIPPED_PROFILE_DIR, HardwareProfile, load_hardware
from lynxsim.models.spec import AttentionSpec, ModelSpec

TINY = ModelSpec(
    name="tiny", source="test", num_layers=2, hidden_size=64, vocab_size=256,
    attention=AttentionSpec(num_heads=4, num_kv_heads=2, head_dim=16),
    num_experts=8, top_k=2, expert_ffn_size=32, renormalize=True,
)
TINY_MLA = ModelSpec(
    name="tiny-mla", source="test", num_layers=2, dense_layers=(0,), hidden_size=64, vocab_size=256,
    attention=AttentionSpec(num_heads=4, num_kv_heads=4, head_dim=32, kv_lora_rank=32, qk_nope_head_dim=16,
                            qk_rope_head_dim=16, v_head_dim=16),
    dense_ffn_size=96, num_experts=8, top_k=2, expert_ffn_size=32, num_shared_experts=1, shared_expert_ffn_size=32,
    renormalize=False,
)
GPU = torch.cuda.is_available()


def _iteration(model: ModelSpec, shape: BatchShape, seed: int, index: int) -> ValidationIteration:
    rng = np.random.default_rng(seed)
    ids = np.stack([
        np.stack([rng.choice(model.num_experts, model.top_k, replace=False) for _ in range(shape.num_tokens)])
        for _ in range(model.num_moe_layers)
    ])
    counts = np.stack([np.bincount(layer.ravel(), minlength=model.num_experts) for layer in ids]).astype(np.int16)
    zero = LatencyBreakdown(0.0, 0.0, 0.0, 0.0, 0.0)
    return ValidationIteration("tiny", "topk", index, shape, counts, zero, 1e-3, "measured")


def _shapes() -> list[BatchShape]:
    return [
        BatchShape(decode_context_tokens=[5, 40, 17]),
        BatchShape(prefill_chunk_tokens=[12, 7], prefill_context_tokens=[0, 30], decode_context_tokens=[9]),
        BatchShape(prefill_chunk_tokens=[16], prefill_context_tokens=[16]),
    ]


@pytest.mark.parametrize("model", [TINY, TINY_MLA], ids=["gqa", "mla-dense-shared"])
def test_sweeps_and_validation_run_on_cpu(model: ModelSpec) -> None:
    """Tiny grid, tiny model, CPU: every unit is timed, the tables feed a measured cost model, and validation
    executes decode, mixed and prefill iterations through every layer."""
    from lynxsim.calib.sweeps import calibrate_model
    from lynxsim.calib.validate import execute_iterations

    plans = plan_model("tiny", model, "tiny")
    lines: list[str] = []
    metadata, tables = calibrate_model("tiny", model, plans, device="cpu", repeats=1, log=lines.append)
    assert set(tables) == {p.name for p in plans}
    assert all(v > 0 for t in tables.values() for v in t.latency_s)
    assert metadata.gpu_name.startswith("CPU") and metadata.torch_version == torch.__version__
    h200 = load_hardware("h200")
    measured = {"metadata": metadata.model_dump(), "tables": {k: v.model_dump() for k, v in tables.items()}}
    profile = HardwareProfile.model_validate({**h200.model_dump(exclude={"measured"}), "measured": measured})
    cost = MeasuredCostModel(model, profile, "tiny")
    iterations = [
        _iteration(model, shape, seed, i) for i, (seed, shape) in enumerate(zip((1, 2, 3), _shapes(), strict=True))
    ]
    assert cost.iteration(iterations[1].shape, iterations[1].expert_token_counts.astype(np.int64)).total_s > 0
    times, env = execute_iterations(iterations, {"tiny": model}, device="cpu", repeats=1, log=lines.append)
    assert set(times) == {("tiny", "topk", i) for i in range(3)}
    assert all(t > 0 for t in times.values())
    assert env["gpu_name"].startswith("CPU")


def test_validation_feeds_the_recorded_assignment_to_the_experts() -> None:
    """The ids the MoE kernel receives reproduce the recorded per-layer counts (so the distinct experts are
    the policy's), whatever the random router would pick."""
    it = _iteration(TINY, _shapes()[0], 4, 0)
    for layer_counts in it.expert_token_counts:
        ids = expert_assignment(layer_counts, it.shape.num_tokens, TINY.top_k)
        assert np.array_equal(np.bincount(ids.ravel(), minlength=TINY.num_experts), layer_counts)


def test_cpu_timing_median() -> None:
    from lynxsim.calib.timing import invocations_for, time_callable

    calls: list[int] = []
    timing = time_callable(calls.append, invocations=3, device=torch.device("cpu"), repeats=4)
    assert len(calls) == 3 * 5 and timing.invocations == 3 and timing.median_s >= 0
    assert invocations_for(1e-3, 2) == 2 and invocations_for(1e-6, 2) == 64 and invocations_for(1e-4, 20) == 20


# ----- on a GPU -----------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
def test_graph_timing_of_a_known_copy() -> None:
    """A 1 GiB device-to-device copy (2 GiB moved) timed in a CUDA graph lands between 2 and 5 TB/s."""
    from lynxsim.calib.timing import time_callable

    dev = torch.device("cuda")
    src = torch.randn(1 << 28, device=dev)
    dst = torch.empty_like(src)
    timing = time_callable(lambda i: dst.copy_(src), invocations=4, device=dev, repeats=5)
    rate = 2 * src.numel() * 4 / timing.median_s
    assert 2e12 < rate < 5e12


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
def test_tiny_calibration_and_validation_on_gpu() -> None:
    """Tiny grid of OLMoE-1B-7B's shape on the GPU, then a few of its simulated iterations executed: the
    measured cost model built from these tables predicts them within 25% (the committed tables, on the default
    grid, are validated in docs/validation.md)."""
    from lynxsim.calib.iterations import (
        reprice,
        select_iterations,
        simulate_and_record,
        validation_config,
    )
    from lynxsim.calib.sweeps import calibrate_model
    from lynxsim.calib.validate import execute_iterations
    from lynxsim.models import load_catalog_model

    model = load_catalog_model("olmoe-1b-7b")
    metadata, tables = calibrate_model("olmoe-1b-7b", model, plan_model("olmoe-1b-7b", model, "tiny"), repeats=3)
    h200 = load_hardware("h200")
    measured = {"metadata": metadata.model_dump(), "tables": {k: v.model_dump() for k, v in tables.items()}}
    profile = HardwareProfile.model_validate({**h200.model_dump(exclude={"measured"}), "measured": measured})
    recorded = simulate_and_record(validation_config("olmoe-1b-7b", "h200", ["topk"], requests=32), "olmoe-1b-7b")
    picked = select_iterations(recorded["topk"], batch_targets=(1, 8, 32), mixed=1)
    picked = reprice(picked, MeasuredCostModel(model, profile, "olmoe-1b-7b"))
    times, _ = execute_iterations(picked, {"olmoe-1b-7b": model}, repeats=5)
    for it in picked:
        assert abs(it.predicted_gpu_s / times[(it.model_key, it.policy, it.index)] - 1) < 0.25


def test_moe_token_axis_is_refined_at_kernel_configuration_changes() -> None:
    """Mixtral-8x7B's fused MoE changes tiles at 65, 129, 193 and 257 tokens (and switches to the grouped GEMM at
    1024): the refined axis has both sides of each, so no interpolation spans a jump."""
    from lynxsim.calib.kernels.weights import LayerShape
    from lynxsim.calib.sweeps import moe_config_boundaries, refine_moe_plan
    from lynxsim.models import load_catalog_model

    model = load_catalog_model("mixtral-8x7b")
    shape = LayerShape.from_spec(model)
    boundaries = moe_config_boundaries(shape, 2048)
    assert {65, 129, 193, 257, 1024} <= set(boundaries)
    plan = next(p for p in plan_model("mixtral-8x7b", model) if p.unit == "moe")
    refined = refine_moe_plan(plan, shape)
    assert {64, 65, 192, 193, 256, 257, 1023, 1024} <= set(refined.axis_values[0])
    assert refined.axis_values[1] == plan.axis_values[1]


def test_calibrate_units_keeps_the_other_tables(tmp_path, monkeypatch) -> None:
    """`lynxsim calibrate --units moe` re-measures one unit and keeps the model's other tables in the profile."""
    from lynxsim.calib import sweeps
    from lynxsim.calib.commands import main
    from lynxsim.calib.plan import roofline_tables
    from lynxsim.calib.profile_io import replace_top_level_block
    from lynxsim.hardware import CalibrationMetadata

    profile = tmp_path / "gpu.yaml"
    text = (SHIPPED_PROFILE_DIR / "h200.yaml").read_text()
    profile.write_text(replace_top_level_block(text, "measured", "measured: {}\n"))
    h200 = load_hardware("h200")
    meta = CalibrationMetadata(gpu_name="test GPU", torch_version="t", cuda_version="c", date="2026-11-28", notes="n")

    def fake(key, spec, plans, **kwargs):
        tables = roofline_tables(plans, spec, h200)
        return meta, {name: t.model_copy(update={"latency_s": tuple(2 * v for v in t.latency_s)})
                      for name, t in tables.items()}

    tables_out = tmp_path / "tables"
    assert main(["calibrate", "--models", "olmoe-1b-7b", "--grid", "tiny", "--dry-run", "--tables-out",
                 str(tables_out), "--profile", str(profile)]) == 0
    assert main(["calibrate", "--merge", str(tables_out / "olmoe-1b-7b.yaml"), "--profile", str(profile)]) == 0
    before = load_hardware(profile).measured.tables
    monkeypatch.setattr(sweeps, "calibrate_model", fake)
    assert main(["calibrate", "--models", "olmoe-1b-7b", "--grid", "tiny", "--units", "moe", "--profile",
                 str(profile)]) == 0
    after = load_hardware(profile).measured
    assert set(after.tables) == set(before)
    doubled = [2 * v for v in before["olmoe-1b-7b/moe"].latency_s]
    assert after.tables["olmoe-1b-7b/moe"].latency_s == pytest.approx(doubled, rel=1e-3)
    assert after.tables["olmoe-1b-7b/lm_head"] == before["olmoe-1b-7b/lm_head"]
    assert "kept from the earlier run" in after.metadata_for("olmoe-1b-7b/moe").notes


@pytest.mark.parametrize("model", [TINY, TINY_MLA], ids=["gqa", "mla-dense-shared"])
def test_a_tensor_parallel_iteration_reduces_twice_per_layer(model: ModelSpec) -> None:
    """Each layer's attention output and FFN/expert output are reduced over the TP group: 2 per layer, as the
    instance cost model prices them (``ParallelCostModel``: 2 x num_layers all-reduces of [T, H])."""
    from lynxsim.calib import units
    from lynxsim.calib.validate import ModelOnDevice

    reduced: list[tuple[int, ...]] = []

    def count(partial: torch.Tensor) -> torch.Tensor:
        reduced.append(tuple(partial.shape))
        return partial

    it = _iteration(model, _shapes()[1], 5, 0)
    on_cpu = ModelOnDevice(model, torch.device("cpu"), units.pages_for([9, 12, 37]) + 4, reduce=count)
    on_cpu.build(it, seed=0)(0)
    assert reduced == [(it.shape.num_tokens, model.hidden_size)] * (2 * model.num_layers)


def test_tensor_parallel_validation_runs_two_ranks_on_cpu() -> None:
    """Two processes join a gloo group and execute the TP2 shard's iterations in step; rank 0's timings come
    back for every iteration."""
    from lynxsim.calib.validate import execute_iterations
    from lynxsim.parallel import ParallelPlan, shard_model

    shard = shard_model(TINY, ParallelPlan(tensor_parallel=2))
    assert shard.attention.num_heads == 2 and shard.expert_ffn_size == 16
    iterations = [
        _iteration(TINY, shape, seed, i) for i, (seed, shape) in enumerate(zip((1, 2), _shapes()[:2], strict=True))
    ]
    times, env = execute_iterations(iterations, {"tiny": shard}, device="cpu", repeats=1, tensor_parallel=2,
                                    log=lambda _: None)
    assert set(times) == {("tiny", "topk", 0), ("tiny", "topk", 1)}
    assert all(t > 0 for t in times.values())
    assert env["gpu_name"].startswith("2x CPU") and "gloo" in env["gpu_name"]
