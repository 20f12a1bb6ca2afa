"""The pricing formulas (lynxsim/cost_formulas.py) that the Python cost models and the compiled engine share:
hand-worked iterations on hand-built arrays (roofline, measured tables at, between and outside their grid points,
expert parallelism), the cost models' own numbers through them, and the same numbers without numba."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lynxsim import cost_formulas as f
from lynxsim.cost import DIAGNOSTIC_UNITS, MEASURED_UNITS, MIN_PRICING_TOKENS, MeasuredCostModel, UnitRooflines
from lynxsim.datatypes import BatchShape
from lynxsim.hardware import load_hardware
from lynxsim.jit import DISABLE_VARIABLE
from lynxsim.models import load_catalog_model
from lynxsim.parallel import ParallelPlan, make_instance_cost_model

H200 = load_hardware("h200")
NO_RANKS = np.zeros((1, 1), dtype=np.int64)

# A two-layer model with round numbers: 1 TB/s, 1 TFLOP/s everywhere, 1 us launches.
TERMS = {
    "num_layers": 2.0, "bandwidth_bytes_per_s": 1e12, "kernel_launch_s": 1e-6, "overhead_s": 5e-4,
    "kv_bytes_per_token_layer": 1000.0, "decode_flops_per_pair": 100.0, "prefill_flops_per_pair": 200.0,
    "attention_flops_per_s": 1e12, "attention_launch_s": 1e-6,
    "expert_bytes": 1e6, "flops_per_assignment": 1e6, "top_k": 2.0, "moe_flops_per_s": 1e12, "moe_launch_s": 2e-6,
    "attention_unit_bytes": 0.0, "attention_unit_flops_per_row": 0.0,
    "attention_decode_flops_per_s": 1e12, "attention_decode_launch_s": 1e-6,
}


def _pricing(kind: int = f.ROOFLINE, tables: dict[int, np.ndarray] | None = None, ranks: int = 0,
             rank_kind: int = f.ROOFLINE, capacity: int = 200, **changed: float) -> f.Pricing:
    """A pricing of ``TERMS`` (with ``changed`` ones) for up to ``capacity`` tokens: dense part 1 us per token
    plus 0.1 us per sequence, all-reduces 10 ns per token, one all-to-all 100 ns per assignment of the busiest
    rank."""
    terms = f.terms_array({**TERMS, **changed})
    packed, table_at = f.packed_tables(tables or {})
    counts = np.arange(capacity + 1, dtype=np.float64)
    assignments = np.arange(f.assignment_capacity(capacity, 2) + 1, dtype=np.float64)
    return f.Pricing(kind=kind, terms=np.stack([terms, terms]), tables=packed, table_at=table_at,
                     dense_s=np.stack([counts * 1e-6, counts * 1e-7]), allreduce_s=counts * 1e-8,
                     all_to_all_s=assignments * 1e-7, experts_cache_s=np.full((assignments.size, 9), np.nan),
                     ranks=ranks, rank_kind=rank_kind)


def _price(pricing: f.Pricing, decode: list[int], chunks: list[int], contexts: list[int], distinct: list[int],
           assignments: list[int], rank_distinct: np.ndarray = NO_RANKS,
           rank_assignments: np.ndarray = NO_RANKS) -> np.ndarray:
    out = np.full(6, np.nan)
    needed = f.price_batch(pricing, np.array(decode, dtype=np.int64), np.array(chunks, dtype=np.int64),
                           np.array(contexts, dtype=np.int64), np.array(distinct, dtype=np.int64),
                           np.array(assignments, dtype=np.int64), rank_distinct, rank_assignments, out)
    assert needed == 0
    return out


def test_roofline_iteration_by_hand() -> None:
    """Decode rows of 1000 and 2000 tokens and a 100-token chunk after 50 cached ones; 2 and 4 experts of two
    MoE layers, 204 assignments each."""
    out = _price(_pricing(), decode=[1000, 2000], chunks=[100], contexts=[50], distinct=[2, 4],
                 assignments=[204, 204])
    # attention: KV read 1000 B * (3000 + 150) = 3.15 us; FLOPs 100 * 3000 + 200 * 100 * (50 + 101 / 2) = 2.31 us
    attention = 2 * (3.15e-6 + 1e-6)
    dense = 102 * 1e-6 + 3 * 1e-7  # 102 tokens, 3 sequences
    # experts: compute-bound, 204 * 1 MFLOP = 204 us, over 2 (and 4) * 1 MB = 2 (4) us of weights; 2 us of launches
    moe = 2 * (204e-6 + 2e-6)
    communication = 102 * 1e-8
    expected = [attention, dense, moe, communication, 5e-4, attention + dense + moe + communication + 5e-4]
    assert out == pytest.approx(expected, rel=1e-12)


def test_memory_bound_experts_and_layers_without_tokens() -> None:
    """A decode layer with 4 experts of 1 MB and 8 assignments of 100 kFLOP each reads 4 us of weights and
    computes 0.8 us; a layer without tokens costs its launches only."""
    pricing = _pricing(flops_per_assignment=1e5)
    out = _price(pricing, decode=[10] * 4, chunks=[], contexts=[], distinct=[4, 0], assignments=[8, 0])
    assert out[2] == pytest.approx(4e-6 + 2e-6 + 2e-6, rel=1e-12)


def test_expert_parallel_takes_the_slowest_rank_and_the_busiest_rank_all_to_all() -> None:
    """Two ranks, two layers: layer 0's ranks hold 3 experts (6 assignments: 6 us of compute) and 1 expert (1);
    layer 1's 1 (2 assignments) and 5 (300 assignments: 300 us). Each layer: its slowest rank; two all-to-alls at
    its busiest rank's assignments."""
    rank_distinct = np.array([[3, 1], [1, 5]], dtype=np.int64)
    rank_assignments = np.array([[6, 1], [2, 300]], dtype=np.int64)
    out = _price(_pricing(ranks=2), decode=[10] * 4, chunks=[], contexts=[], distinct=[4, 6],
                 assignments=[7, 302], rank_distinct=rank_distinct, rank_assignments=rank_assignments)
    assert out[2] == pytest.approx((6e-6 + 2e-6) + (300e-6 + 2e-6), rel=1e-12)
    assert out[3] == pytest.approx(4 * 1e-8 + 2 * (6 + 300) * 1e-7, rel=1e-12)
    per_layer = np.empty(2)
    f.routed_experts_layers_s(_pricing(ranks=2), f.RANK_EXPERTS, rank_distinct, rank_assignments, per_layer)
    assert per_layer == pytest.approx([8e-6, 302e-6], rel=1e-12)


def _table(axes: list[list[float]], latency: np.ndarray) -> np.ndarray:
    return f.pack_table([np.asarray(a, dtype=np.float64) for a in axes], latency)


def test_interpolation_at_between_and_outside_grid_points() -> None:
    """t = 1e-9 * x * y**2 on [1, 4] x [10, 1000]: exact at grid points and, a power law, between them (log-log
    bilinear); outside, the edge value times the roofline's ratio, or the edge value without a roofline."""
    x, y = [1.0, 4.0], [10.0, 1000.0]
    table = _table([x, y], np.array([[1e-9 * a * b**2 for b in y] for a in x]))
    assert f.interpolated(table, 0, 4.0, 10.0, 0.0, 0.0) == pytest.approx(4e-7, rel=1e-12)
    assert f.interpolated(table, 0, 2.0, 100.0, 0.0, 0.0) == pytest.approx(2e-5, rel=1e-12)
    # 8 rows: clamped to 4; the roofline says 8 rows cost 1.5 times 4 rows
    assert f.interpolated(table, 0, 8.0, 100.0, 3.0, 2.0) == pytest.approx(4e-5 * 1.5, rel=1e-12)
    assert f.interpolated(table, 0, 8.0, 100.0, 0.0, 0.0) == pytest.approx(4e-5, rel=1e-12)
    assert f.clamped(table, 0, 8.0, 5.0) == (4.0, 10.0)
    # inside the grid the roofline values are not used
    assert f.interpolated(table, 0, 2.0, 100.0, 3.0, 2.0) == pytest.approx(2e-5, rel=1e-12)


def test_one_axis_table_and_an_axis_from_zero() -> None:
    """A one-axis table reads its second coordinate 0; an axis starting at 0 is interpolated in log(1 + x):
    [0, 3] -> [1e-5, 4e-5] gives their geometric mean at x = 1 (log 2 is halfway to log 4)."""
    table = _table([[0.0, 3.0]], np.array([1e-5, 4e-5]))
    assert table[f.N1] == 1 and table[f.LOG1P0] == 1.0
    assert f.interpolated(table, 0, 1.0, 0.0, 0.0, 0.0) == pytest.approx(2e-5, rel=1e-12)
    assert f.interpolated(table, 0, 0.0, 0.0, 0.0, 0.0) == pytest.approx(1e-5, rel=1e-12)


def test_unit_rooflines_by_hand() -> None:
    """A decode attention call of 2 rows at 10000 tokens reads 2e7 B of KV (20 us) and does 2e6 FLOPs (2 us);
    with MLA's kv_b weights (1 MB) and 1000 FLOPs per row on top; the experts' unit takes tokens, not
    assignments; a graph launch is one launch."""
    terms = f.terms_array(TERMS)
    assert f.unit_roofline(f.ATTENTION_DECODE, terms, 2.0, 10000.0) == pytest.approx(20e-6 + 1e-6, rel=1e-12)
    mla = f.terms_array({**TERMS, "attention_unit_bytes": 1e6, "attention_unit_flops_per_row": 1000.0})
    assert f.unit_work(f.ATTENTION_DECODE, mla, 2.0, 10000.0) == pytest.approx((2e7 + 1e6, 2e6 + 2000.0))
    assert f.unit_roofline(f.MOE, terms, 102.0, 2.0) == pytest.approx(f.experts_roofline_s(terms, 204.0, 2.0))
    assert f.unit_roofline(f.GRAPH_LAUNCH, terms, 3.0, 0.0) == pytest.approx(3e-6, rel=1e-12)


def test_measured_iteration_by_hand() -> None:
    """Measured attention and experts from power-law tables (exact under log-space interpolation): decode
    t = 1e-9 * batch * context, experts t = 1e-6 * sqrt(tokens) * distinct. Past the largest context the edge
    value is scaled by the decode attention's roofline (memory-bound here: KV bytes plus the launch)."""
    decode = _table([[1, 8], [100, 10000]], np.array([[1e-9 * b * c for c in (100, 10000)] for b in (1, 8)]))
    moe = _table([[1, 64], [1, 8]], np.array([[1e-6 * math.sqrt(t) * d for d in (1, 8)] for t in (1, 64)]))
    pricing = _pricing(kind=f.MEASURED, tables={f.ATTENTION_DECODE: decode, f.MOE: moe})
    out = _price(pricing, decode=[1000, 2000], chunks=[], contexts=[], distinct=[2, 4], assignments=[8, 32])
    assert out[0] == pytest.approx(2 * 1e-9 * 2 * 1500, rel=1e-12)
    assert out[2] == pytest.approx(1e-6 * (math.sqrt(4) * 2 + math.sqrt(16) * 4), rel=1e-12)
    assert pricing.experts_cache_s[[8, 32], [2, 4]] == pytest.approx([4e-6, 16e-6], rel=1e-12)  # remembered
    again = _price(pricing, decode=[1000, 2000], chunks=[], contexts=[], distinct=[2, 4], assignments=[8, 32])
    assert np.array_equal(again, out)
    # mean context 30000, past the grid: edge (2, 10000) scaled by (2 * 30000 KV reads) / (2 * 10000) + launches
    far = _price(pricing, decode=[20000, 40000], chunks=[], contexts=[], distinct=[2, 4], assignments=[8, 32])
    ratio = (6e7 / 1e12 + 1e-6) / (2e7 / 1e12 + 1e-6)
    assert far[0] == pytest.approx(2 * 1e-9 * 2 * 10000 * ratio, rel=1e-12)


def test_every_measured_unit_has_a_formula() -> None:
    assert set(f.UNIT_NAMES) == set(MEASURED_UNITS) | set(DIAGNOSTIC_UNITS)
    assert len(f.TERM_NAMES) == f.UNIT_LAUNCH + len(f.WORK_UNITS)
    with pytest.raises(ValueError, match="unknown pricing terms"):
        f.terms_array({"expert_memory_s": 1.0})


def test_activity_arrays_of_different_shapes_are_rejected() -> None:
    with pytest.raises(ValueError, match="differ in shape"):
        _price(_pricing(), decode=[10], chunks=[], contexts=[], distinct=[1, 1], assignments=[2])


def test_capacity_needed() -> None:
    pricing = _pricing(ranks=2, capacity=10)
    assert f.capacity(pricing) == 10
    assert f.capacity_needed(pricing, 10, NO_RANKS) == 0
    assert f.capacity_needed(pricing, 11, NO_RANKS) == 11
    assert f.capacity_needed(pricing, 4, np.array([[30, 1]], dtype=np.int64)) == 15  # 30 assignments, top-2


# ----- the cost models price through the formulas ------------------------------------------------------------------


@pytest.fixture(scope="module")
def measured() -> MeasuredCostModel:
    cost = make_instance_cost_model(load_catalog_model("mixtral-8x7b"), H200, "mixtral-8x7b", ParallelPlan())
    assert isinstance(cost, MeasuredCostModel)
    return cost


def test_measured_model_and_its_tables_agree_bit_for_bit(measured: MeasuredCostModel) -> None:
    """The cost model's attention is its layers times the table interpolator's value, inside the grid and past
    it, to the last bit: both evaluate ``interpolated`` with the unit's roofline."""
    layers = measured.model.num_layers
    for contexts in ([300, 500], [90_000, 130_000]):
        batch = BatchShape(decode_context_tokens=contexts)
        table = measured.units["attention_decode"].scalar(2, sum(contexts) / 2)
        assert measured.attention_time_s(batch) == layers * table
    chunk = BatchShape(prefill_chunk_tokens=[7000], prefill_context_tokens=[0])
    assert measured.attention_time_s(chunk) == layers * measured.units["attention_prefill"].scalar(7000, 0)


def test_unit_rooflines_are_the_formulas(measured: MeasuredCostModel) -> None:
    roof = UnitRooflines(measured.model, H200)
    terms = f.terms_array(roof.roofline_terms())
    for unit, point in (("moe", (5.0, 3.0)), ("attention_prefill", (64.0, 512.0)), ("lm_head", (9.0,)),
                        ("dense_layer", (33.0,))):
        assert float(roof.unit_roofline(unit)(*point)) == f.unit_roofline(f.UNIT_NAMES.index(unit), terms, *point,
                                                                           *((0.0,) if len(point) == 1 else ()))


def test_batches_past_the_first_arrays_grow_them(measured: MeasuredCostModel) -> None:
    """A Python cost model builds its arrays for MIN_PRICING_TOKENS tokens and rebuilds them larger for a larger
    batch, with the numbers of arrays built that large from the start."""
    cost = make_instance_cost_model(measured.model, H200, "mixtral-8x7b", ParallelPlan())
    tokens = 3 * MIN_PRICING_TOKENS
    batch = BatchShape(prefill_chunk_tokens=[tokens], prefill_context_tokens=[0])
    counts = np.zeros((32, 8), dtype=np.int64)
    counts[:, :] = tokens * 2 // 8
    small = cost.iteration(BatchShape(decode_context_tokens=[5]), np.eye(8, dtype=np.int64)[[0] * 32] * 2)
    assert small.total_s > 0 and f.capacity(cost._priced) == MIN_PRICING_TOKENS
    latency = cost.iteration(batch, counts)
    assert f.capacity(cost._priced) >= tokens
    out = np.empty(6)
    activity = cost.activity(counts)
    assert f.price_batch(cost.pricing(4 * tokens), batch.decode_context_tokens, batch.prefill_chunk_tokens,
                         batch.prefill_context_tokens, activity.distinct, activity.assignments, NO_RANKS, NO_RANKS,
                         out) == 0
    assert latency.as_dict() == dict(zip(["attention_s", "dense_s", "moe_s", "communication_s", "overhead_s",
                                          "total_s"], out.tolist(), strict=True))


# ----- without numba -------------------------------------------------------------------------------------------------

_PRICE_SCRIPT = """
import json, sys
import numpy as np
from lynxsim.cost import BatchShape
from lynxsim.hardware import load_hardware
from lynxsim.models import load_catalog_model
from lynxsim.parallel import ParallelPlan, make_instance_cost_model

rng = np.random.default_rng(7)
results = []
for key, plan, measured in [("mixtral-8x7b", (1, 1), True), ("mixtral-8x7b", (1, 1), False),
                            ("mixtral-8x7b", (2, 2), True), ("deepseek-v2-lite", (1, 1), True),
                            ("qwen3-30b-a3b", (2, 1), True)]:
    model = load_catalog_model(key)
    cost = make_instance_cost_model(model, load_hardware("h200"), key if measured else None, ParallelPlan(*plan))
    for chunk in (0, 300, 9000):
        counts = np.zeros((model.num_moe_layers, model.num_experts), dtype=np.int64)
        for layer in range(model.num_moe_layers):
            np.add.at(counts[layer], rng.integers(0, model.num_experts, size=(40 + chunk) * model.top_k), 1)
        batch = BatchShape(prefill_chunk_tokens=[chunk] if chunk else [], prefill_context_tokens=[100] if chunk else [],
                           decode_context_tokens=rng.integers(1, 20000, size=40))
        results.append(list(cost.iteration(batch, counts).as_dict().values()))
print(json.dumps(results))
"""


def _priced_in_a_fresh_process(no_numba: bool) -> list[list[float]]:
    env = {key: value for key, value in os.environ.items() if key != DISABLE_VARIABLE}
    if no_numba:
        env[DISABLE_VARIABLE] = "1"
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", _PRICE_SCRIPT], capture_output=True, text=True, env=env, cwd=root,
                          check=True)
    return json.loads(done.stdout)


def test_the_formulas_give_the_same_numbers_without_numba() -> None:
    """LYNXSIM_NO_NUMBA runs the formulas as Python: one-GPU roofline and measured, TP and EP, MLA, batches
    inside and past the tables, to the compiled path's numbers bit for bit."""
    compiled = np.array(_priced_in_a_fresh_process(no_numba=False))
    python = np.array(_priced_in_a_fresh_process(no_numba=True))
    assert compiled.shape == python.shape == (15, 6)
    assert np.array_equal(python, compiled)
