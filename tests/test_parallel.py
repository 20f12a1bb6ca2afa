"""Tensor and expert parallelism (lynxsim.parallel): sharding, collectives, EP placement, KV capacity, config."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from lynxsim.config import DeploymentConfig, ExperimentConfig
from lynxsim.cost import MOE_KERNELS_PER_LAYER, CostModel
from lynxsim.datatypes import BatchShape
from lynxsim.errors import InputError
from lynxsim.hardware import load_hardware
from lynxsim.models import load_catalog_model
from lynxsim.parallel import (
    ParallelCostModel,
    ParallelPlan,
    expert_placement,
    make_instance_cost_model,
    placement_matrix,
    shard_model,
)
from lynxsim.runner import prepare, run_experiment

H200 = load_hardware("h200")
H200_UNTABLED = H200.model_copy(update={"collectives": []})  # collectives from latency + bytes / bandwidth
MIXTRAL = load_catalog_model("mixtral-8x7b")


def _config(parallelism: dict | None = None, model: str = "olmoe-1b-7b", **deployment) -> ExperimentConfig:
    raw = {
        "name": "parallel",
        "model": model,
        "hardware": "h200",
        "workload": {
            "arrival": {"kind": "poisson", "rate_per_s": 20.0},
            "prompt_tokens": {"kind": "fixed", "tokens": 64},
            "output_tokens": {"kind": "fixed", "tokens": 8},
        },
        "routing": {"kind": "synthetic"},
        "serving": {"max_num_seqs": 8},
        "deployment": {**deployment, **({"parallelism": parallelism} if parallelism is not None else {})},
        "policies": [{"name": "topk"}],
        "simulation": {"seed": 3, "num_requests": 12},
    }
    return ExperimentConfig.model_validate(raw)


def test_tp1_ep1_is_bit_identical_to_the_one_gpu_model():
    plain = run_experiment(_config())
    explicit = run_experiment(_config({"tensor_parallel": 1, "expert_parallel": 1}))
    a, b = plain.runs[0].iterations, explicit.runs[0].iterations
    assert len(a) > 10
    assert (a["latency_s"].to_numpy() == b["latency_s"].to_numpy()).all()
    assert explicit.setup.kv_cache_blocks == plain.setup.kv_cache_blocks
    assert type(explicit.setup.cost_model) is type(plain.setup.cost_model)
    assert explicit.runs[0].summary["gpus"] == 1.0


def test_tp2_halves_expert_bytes_and_adds_two_allreduces_per_layer():
    plan = ParallelPlan(tensor_parallel=2)
    cost = make_instance_cost_model(MIXTRAL, H200, None, plan)
    assert isinstance(cost, ParallelCostModel)
    one = CostModel(MIXTRAL, H200)
    shard = shard_model(MIXTRAL, plan)
    # 14336 / 2 = 7168: exactly half of each expert's weights per GPU
    assert shard.expert_bytes == pytest.approx(MIXTRAL.expert_bytes / 2)
    assert shard.attention.num_heads == 16 and shard.attention.num_kv_heads == 4
    # decode, memory bound: every expert active in every layer, 8 tokens
    counts = np.full((MIXTRAL.num_moe_layers, MIXTRAL.num_experts), 2, dtype=np.int64)
    bw = H200.sustained_bandwidth_bytes_per_s
    launch = H200.efficiency.kernel_launch_s
    moe_one = MIXTRAL.num_moe_layers * (8 * MIXTRAL.expert_bytes / bw + MOE_KERNELS_PER_LAYER * launch)
    moe_two = MIXTRAL.num_moe_layers * (8 * MIXTRAL.expert_bytes / 2 / bw + MOE_KERNELS_PER_LAYER * launch)
    assert one.moe_time_s(counts) == pytest.approx(moe_one)
    batch = BatchShape(decode_context_tokens=np.full(8, 300))
    latency = cost.iteration(batch, counts)
    assert latency.moe_s == pytest.approx(moe_two)
    # all-reduce: 2 per layer of 8 tokens * 4096 hidden * 2 bytes = 65536 bytes, a size the H200 profile's
    # 2-GPU in-graph table measured: 13.11 us each
    assert latency.communication_s == pytest.approx(2 * 32 * 1.311e-5)
    # without the table: latency + bytes on the wire (ring factor 2 * (2 - 1) / 2 = 1) over the bandwidth
    untabled = make_instance_cost_model(MIXTRAL, H200_UNTABLED, None, ParallelPlan(tensor_parallel=2))
    per = 65536 / H200.sustained_interconnect_bytes_per_s + H200.efficiency.collective_latency_s
    assert untabled.iteration(batch, counts).communication_s == pytest.approx(2 * 32 * per)
    assert cost.weight_bytes_per_gpu < 0.51 * MIXTRAL.weight_bytes


@settings(max_examples=60, deadline=None)
@given(ranks=st.integers(1, 16), per_rank=st.integers(1, 32))
def test_ep_placement_puts_every_expert_on_exactly_one_rank_balanced(ranks, per_rank):
    experts = ranks * per_rank
    placement = expert_placement(experts, ranks)
    assert placement.shape == (experts,)
    assert placement.min() >= 0 and placement.max() < ranks
    matrix = placement_matrix(placement, ranks)
    assert (matrix.sum(axis=1) == 1).all()  # every expert exactly once
    assert (matrix.sum(axis=0) == per_rank).all()  # ranks balanced
    assert (np.diff(placement) >= 0).all()  # contiguous


def test_ep_moe_time_is_the_slowest_ranks():
    plan = ParallelPlan(tensor_parallel=2, expert_parallel=2)
    cost = make_instance_cost_model(MIXTRAL, H200_UNTABLED, None, plan)
    assert isinstance(cost, ParallelCostModel)
    counts = np.zeros((MIXTRAL.num_moe_layers, 8), dtype=np.int64)
    counts[:, 0:4] = 4  # rank 0: four experts, 16 assignments
    counts[:, 4] = 1  # rank 1: one expert, 1 assignment
    bw = H200.sustained_bandwidth_bytes_per_s
    launch = MOE_KERNELS_PER_LAYER * H200.efficiency.kernel_launch_s
    rank0 = 4 * MIXTRAL.expert_bytes / bw + launch  # memory bound at 16 assignments
    assert cost.ep_moe_layer_s(cost.activity(counts)) == pytest.approx(np.full(32, rank0))
    batch = BatchShape(decode_context_tokens=np.full(9, 100))
    latency = cost.iteration(batch, counts)
    assert latency.moe_s == pytest.approx(32 * rank0)
    # one all-reduce per layer (attention) + dispatch and combine per MoE layer at rank 0's 16 * 1/2 off-rank rows
    bw_link, lat = H200.sustained_interconnect_bytes_per_s, H200.efficiency.collective_latency_s
    allreduce = 32 * (9 * 4096 * 2 / bw_link + lat)
    a2a = 32 * 2 * (8 * 4096 * 2 / bw_link + lat)
    assert latency.communication_s == pytest.approx(allreduce + a2a)
    # experts whole: half of them per GPU
    assert cost.weight_bytes_per_gpu < 0.52 * MIXTRAL.weight_bytes


def test_kv_capacity_grows_with_tp():
    one = prepare(_config(model="mixtral-8x7b"))
    two = prepare(_config({"tensor_parallel": 2}, model="mixtral-8x7b"))
    four = prepare(_config({"tensor_parallel": 4}, model="mixtral-8x7b"))
    assert one.kv_cache_blocks < two.kv_cache_blocks < four.kv_cache_blocks
    assert two.kv_cache_blocks > 2 * one.kv_cache_blocks  # the weights no longer take most of one GPU
    assert two.gpus_per_instance == 2 and four.gpus_per_instance == 4
    # TP2 has its own measured tables (one rank's shard); TP4 has none: the shard's roofline, and it says so
    assert two.cost_model.source == "measured (mixtral-8x7b@tp2 tables)"
    assert four.cost_model.source == "roofline (tp4: the measured tables are TP1; no mixtral-8x7b@tp4 tables)"


def test_kv_transfer_runs_over_tp_links():
    from lynxsim.runner import kv_transfer

    one = prepare(_config(model="mixtral-8x7b", mode="disaggregated"))
    two = prepare(_config({"tensor_parallel": 2}, model="mixtral-8x7b", mode="disaggregated"))
    assert kv_transfer(two).time_s(1000) == pytest.approx(kv_transfer(one).time_s(1000) / 2)


def test_config_errors():
    for bad in ({"tensor_parallel": 0}, {"expert_parallel": -1}, {"tensor_parallel": 1.5}, {"tensor_parallel": True},
                {"tensor_parallel": "2"}, {"tensor_parallel": 4, "expert_parallel": 2}, {"pipeline": 2}):
        with pytest.raises(ValidationError):
            DeploymentConfig(parallelism=bad)
    with pytest.raises(InputError, match="expert_parallel"):
        prepare(_config({"expert_parallel": 3}, model="mixtral-8x7b"))  # 8 experts over 3 ranks
    with pytest.raises(InputError, match="tensor_parallel"):
        prepare(_config({"tensor_parallel": 3}, model="mixtral-8x7b"))  # 32 heads over 3 GPUs
    with pytest.raises(ValueError):
        ParallelPlan(tensor_parallel=0)


def test_kv_heads_replicate_when_tp_exceeds_them():
    shard = shard_model(MIXTRAL, ParallelPlan(tensor_parallel=16))  # 8 KV heads, 32 heads
    assert shard.attention.num_kv_heads == 1 and shard.attention.num_heads == 2
    assert shard.kv_bytes_per_token == pytest.approx(MIXTRAL.kv_bytes_per_token / 8)
