"""The roofline cost model: hand-worked figures, monotonicity, and the memory-bound/compute-bound split that
Lynx's gains rest on."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lynxsim.cost import ATTENTION_KERNELS_PER_LAYER, MOE_KERNELS_PER_LAYER, CostModel
from lynxsim.datatypes import BatchShape, LatencyBreakdown
from lynxsim.errors import InputError
from lynxsim.hardware import load_hardware
from lynxsim.models.spec import AttentionSpec, ModelSpec

MIXTRAL = ModelSpec(
    name="Mixtral-8x7B",
    source="mistralai/Mixtral-8x7B-v0.1 config.json",
    num_layers=32,
    hidden_size=4096,
    vocab_size=32000,
    attention=AttentionSpec(num_heads=32, num_kv_heads=8, head_dim=128),
    num_experts=8,
    top_k=2,
    expert_ffn_size=14336,
    renormalize=True,
    lynx_alpha=0.7,
    lynx_beta=1,
)

# DeepSeek-V2-Lite-like: MLA attention, a dense first layer, shared experts.
MLA_MODEL = ModelSpec(
    name="MLA test model",
    source="test",
    num_layers=4,
    dense_layers=(0,),
    hidden_size=2048,
    vocab_size=102400,
    attention=AttentionSpec(
        num_heads=16, num_kv_heads=16, head_dim=128, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
    ),
    dense_ffn_size=10944,
    num_experts=64,
    top_k=6,
    expert_ffn_size=1408,
    num_shared_experts=2,
    shared_expert_ffn_size=1408,
    renormalize=False,
)

H200 = load_hardware("h200")


@pytest.fixture(scope="module")
def mixtral_h200() -> CostModel:
    return CostModel(MIXTRAL, H200)


def _counts(distinct: int, tokens_per_expert: int = 1, layers: int = 32, experts: int = 8) -> np.ndarray:
    counts = np.zeros((layers, experts), dtype=np.int64)
    counts[:, :distinct] = tokens_per_expert
    return counts


def _decode(batch: int, context: int = 1024) -> BatchShape:
    return BatchShape(decode_context_tokens=np.full(batch, context))


def test_mixtral_decode_all_experts_hand_worked(mixtral_h200: CostModel) -> None:
    """Batch 32, all 8 experts active in all 32 layers: each expert's 352 MB is read once per layer."""
    expert_bytes = 3 * 4096 * 14336 * 2
    assert MIXTRAL.expert_bytes == expert_bytes  # 352.3 MB
    bandwidth_s = 32 * 8 * expert_bytes / 4.22e12  # 21.37 ms
    assert bandwidth_s == pytest.approx(21.4e-3, rel=1e-2)
    launch_s = 32 * MOE_KERNELS_PER_LAYER * H200.efficiency.kernel_launch_s
    result = mixtral_h200.iteration(_decode(32), _counts(8, tokens_per_expert=8))
    assert result.moe_s == pytest.approx(bandwidth_s + launch_s, rel=1e-2)
    # The weight reads dominate the fixed kernel costs: within 2% of the bandwidth term alone.
    assert result.moe_s == pytest.approx(bandwidth_s, rel=2e-2)


def test_mixtral_decode_attention_hand_worked(mixtral_h200: CostModel) -> None:
    """64 rows of 1024 cached tokens: 2 (K, V) * 8 heads * 128 dims * 2 bytes = 4 KiB per token per layer."""
    result = mixtral_h200.iteration(_decode(64, 1024), _counts(8, 16))
    kv_bytes = 64 * 1024 * 4096
    expected = 32 * (kv_bytes / 4.22e12 + ATTENTION_KERNELS_PER_LAYER * H200.efficiency.kernel_launch_s)
    assert result.attention_s == pytest.approx(expected, rel=1e-9)


def test_prefill_chunk_is_compute_bound(mixtral_h200: CostModel) -> None:
    """A 2048-token chunk with 512 assignments per expert: FLOPs set the time, not the weight reads."""
    chunk = BatchShape(prefill_chunk_tokens=[2048], prefill_context_tokens=[0])
    counts = _counts(8, tokens_per_expert=2048 * 2 // 8)
    result = mixtral_h200.iteration(chunk, counts)
    rate = 0.78 * 989.4e12
    compute_s = 32 * 2 * (2048 * 2) * MIXTRAL.expert_params / rate
    memory_s = 32 * 8 * MIXTRAL.expert_bytes / 4.22e12
    assert compute_s > 2 * memory_s
    launch_s = 32 * MOE_KERNELS_PER_LAYER * H200.efficiency.kernel_launch_s
    assert result.moe_s == pytest.approx(compute_s + launch_s, rel=1e-9)
    # Causal attention FLOPs: 2 * 32 heads * (128 + 128) * sum_i i over the chunk, per layer.
    pairs = 2048 * 2049 / 2
    attention_compute_s = 32 * (2 * 32 * 256 * pairs / rate + H200.efficiency.kernel_launch_s)
    assert result.attention_s == pytest.approx(attention_compute_s, rel=1e-9)
    # Compute-bound: doubling the chunk roughly doubles the routed-expert and dense time.
    double = mixtral_h200.iteration(BatchShape(prefill_chunk_tokens=[4096], prefill_context_tokens=[0]), counts * 2)
    assert double.moe_s / result.moe_s > 1.9
    assert double.dense_s / result.dense_s > 1.8


def test_decode_is_memory_bound(mixtral_h200: CostModel) -> None:
    """With the same experts active, decode batch 64 costs the routed experts no more than batch 16."""
    small = mixtral_h200.iteration(_decode(16), _counts(8, 4))
    large = mixtral_h200.iteration(_decode(64), _counts(8, 16))
    assert large.moe_s == pytest.approx(small.moe_s)
    assert large.dense_s == pytest.approx(small.dense_s)


def test_fewer_distinct_experts_is_faster_in_decode(mixtral_h200: CostModel) -> None:
    """Lynx's premise: at fixed batch, decode time grows linearly with distinct experts per layer."""
    times = [mixtral_h200.iteration(_decode(32), _counts(d, 64 // d)).moe_s for d in (2, 4, 8)]
    step = MIXTRAL.num_moe_layers * 2 * MIXTRAL.expert_bytes / 4.22e12
    assert times[1] - times[0] == pytest.approx(step)
    assert times[2] - times[1] == pytest.approx(2 * step)


def test_breakdown_sums_to_total(mixtral_h200: CostModel) -> None:
    batch = BatchShape(prefill_chunk_tokens=[512, 100], prefill_context_tokens=[0, 3000],
                       decode_context_tokens=[10, 400, 2000])
    result = mixtral_h200.iteration(batch, _counts(8, 100))
    parts = result.as_dict()
    assert parts["total_s"] == pytest.approx(sum(v for k, v in parts.items() if k != "total_s"))
    assert result.communication_s == 0.0
    assert result.overhead_s == H200.efficiency.iteration_overhead_s
    assert set(parts) == {"attention_s", "dense_s", "moe_s", "communication_s", "overhead_s", "total_s"}


def test_layers_without_tokens_cost_only_launch(mixtral_h200: CostModel) -> None:
    empty = mixtral_h200.moe_time_s(np.zeros((32, 8), dtype=np.int64))
    assert empty == pytest.approx(32 * MOE_KERNELS_PER_LAYER * H200.efficiency.kernel_launch_s)
    one_layer = _counts(0)
    one_layer[5, 3] = 1
    assert mixtral_h200.moe_time_s(one_layer) == pytest.approx(empty + MIXTRAL.expert_bytes / 4.22e12)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.lists(st.integers(0, 64), min_size=8, max_size=8), min_size=32, max_size=32),
    st.integers(0, 31),
    st.integers(0, 7),
)
def test_moe_cost_monotone_in_distinct_experts(rows: list[list[int]], layer: int, expert: int) -> None:
    """Spreading the same assignments over one more expert never makes a layer cheaper, nor does adding
    assignments."""
    model = CostModel(MIXTRAL, H200)
    counts = np.array(rows, dtype=np.int64)
    base = model.moe_time_s(counts)
    more = counts.copy()
    more[layer, expert] += 1
    assert model.moe_time_s(more) >= base
    donor = int(np.argmax(counts[layer]))
    idle = np.flatnonzero(counts[layer] == 0)
    if counts[layer, donor] >= 2 and idle.size:
        spread = counts.copy()
        spread[layer, donor] -= 1
        spread[layer, idle[0]] = 1
        assert model.moe_time_s(spread) >= base


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 200_000), min_size=1, max_size=64), st.data())
def test_cost_monotone_in_decode_context(contexts: list[int], data: st.DataObject) -> None:
    model = CostModel(MIXTRAL, H200)
    index = data.draw(st.integers(0, len(contexts) - 1))
    extra = data.draw(st.integers(1, 100_000))
    counts = _counts(8, 1)
    longer = list(contexts)
    longer[index] += extra
    base = model.iteration(BatchShape(decode_context_tokens=contexts), counts)
    grown = model.iteration(BatchShape(decode_context_tokens=longer), counts)
    assert grown.attention_s >= base.attention_s
    assert grown.total_s >= base.total_s


def test_mla_model_runs_and_decode_uses_absorbed_attention() -> None:
    model = CostModel(MLA_MODEL, H200)
    counts = np.zeros((MLA_MODEL.num_moe_layers, 64), dtype=np.int64)
    counts[:, :12] = 1
    result = model.iteration(BatchShape(decode_context_tokens=[4096, 4096]), counts)
    assert result.total_s > 0
    # Absorbed MLA decode: each head attends over the 576-wide latent (q.k) and the 512-wide latent (p.v).
    flops = 2 * 16 * (576 + 512) * 8192
    kv_bytes = 576 * 2 * 8192
    per_layer = max(flops / (0.78 * 989.4e12), kv_bytes / 4.22e12) + H200.efficiency.kernel_launch_s
    assert result.attention_s == pytest.approx(4 * per_layer)


def test_lm_head_runs_once_per_sequence(mixtral_h200: CostModel) -> None:
    """One 8192-token chunk samples one position; 8192 decode rows sample 8192. Every other GEMM sees 8192 rows
    either way, so the difference is the LM head's compute-bound 8192 rows against its weight read."""
    chunk = mixtral_h200.dense_time_s(BatchShape(prefill_chunk_tokens=[8192], prefill_context_tokens=[0]))
    rows = mixtral_h200.dense_time_s(_decode(8192))
    lm_head_params = 32000 * 4096
    expected = 2 * 8192 * lm_head_params / (0.78 * 989.4e12) - lm_head_params * 2 / 4.22e12
    assert rows - chunk == pytest.approx(expected, rel=1e-9)


def test_counts_shape_is_checked(mixtral_h200: CostModel) -> None:
    with pytest.raises(ValueError, match="expected"):
        mixtral_h200.iteration(_decode(4), np.zeros((31, 8), dtype=np.int64))


def test_empty_batch_is_rejected(mixtral_h200: CostModel) -> None:
    with pytest.raises(ValueError, match="no tokens"):
        mixtral_h200.iteration(BatchShape(), _counts(0))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"prefill_chunk_tokens": [4, 5], "prefill_context_tokens": [0]},
        {"prefill_chunk_tokens": [0], "prefill_context_tokens": [0]},
        {"prefill_chunk_tokens": [3], "prefill_context_tokens": [-1]},
        {"decode_context_tokens": [0]},
        {"decode_context_tokens": [[1, 2]]},
    ],
)
def test_batch_shape_validation(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        BatchShape(**kwargs)


def test_batch_shape_counts() -> None:
    batch = BatchShape(prefill_chunk_tokens=[100, 28], prefill_context_tokens=[0, 500],
                       decode_context_tokens=[7, 8, 9])
    counts = (batch.num_prefill_tokens, batch.num_decode_tokens, batch.num_tokens, batch.num_sequences)
    assert counts == (128, 3, 131, 5)
    assert batch.decode_context_tokens.dtype == np.int64


def test_kv_cache_capacity(mixtral_h200: CostModel) -> None:
    assert mixtral_h200.weight_bytes_per_gpu == MIXTRAL.weight_bytes
    capacity = mixtral_h200.kv_cache_capacity_bytes(0.9, 2e9)
    assert capacity == int(H200.memory_bytes * 0.9 - MIXTRAL.weight_bytes - 2e9)
    assert capacity > 30e9


def test_weights_that_do_not_fit_raise_input_error() -> None:
    h100 = CostModel(MIXTRAL, load_hardware("h100-sxm"))  # 93 GB of bf16 weights on an 80 GB GPU
    with pytest.raises(InputError) as info:
        h100.kv_cache_capacity_bytes(0.9, 1e9)
    assert info.value.where == "hardware"
    assert "weights 93.4 GB" in info.value.problem and "do not fit in" in info.value.problem


def test_breakdown_is_a_frozen_record() -> None:
    record = LatencyBreakdown(1.0, 2.0, 3.0, 0.0, 0.5)
    assert record.total_s == 6.5
    with pytest.raises(AttributeError):
        record.moe_s = 0.0  # type: ignore[misc]
    assert CostModel.source == "roofline"
