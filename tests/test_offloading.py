"""Expert offloading (lynxsim/engine/offloading.py, engine/compiled/offloading.py): misses of static and LRU
residency worked by hand, the fetch time and its overlap by hand, and whole runs: every request accounted for, the
breakdown adding up, the same records run after run, however the iterations are routed (in the loop or by the
driver, decode runs routed ahead or one iteration at a time), and nothing changed where every expert is resident
or offloading is off."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lynxsim import cost_formulas as f
from lynxsim.config import ExperimentConfig
from lynxsim.engine.compiled import instance as compiled_instance
from lynxsim.engine.compiled.offloading import Residency, fetch, residency
from lynxsim.engine.compiled.routing import _placeholder
from lynxsim.engine.offloading import ExpertOffloading, host_expert_bytes
from lynxsim.errors import InputError
from lynxsim.metrics import BREAKDOWN_COLUMNS, OFFLOAD_COLUMNS, PER_LAYER_COLUMNS, per_layer
from lynxsim.runner import prepare, simulate_policy


def _state(resident: list[list[int]], experts: int, *, lru: bool, capacity: list[int] | None = None) -> Residency:
    """A residency of ``len(resident)`` layers of ``experts`` experts, each layer's listed ones resident."""
    mask = np.zeros((len(resident), experts), dtype=np.bool_)
    for layer, chosen in enumerate(resident):
        mask[layer, chosen] = True
    slots = np.array(capacity if capacity is not None else [len(r) for r in resident], dtype=np.int64)
    return residency(ExpertOffloading(mask, slots, lru, 1e9, 1e-5), len(resident), experts)


def _active(sets: list[list[int]], experts: int) -> np.ndarray:
    """Tokens per expert ``[layers, experts]``: 3 tokens on each listed expert."""
    counts = np.zeros((len(sets), experts), dtype=np.int32)
    for layer, chosen in enumerate(sets):
        counts[layer, chosen] = 3
    return counts


def _resident(state: Residency) -> list[list[int]]:
    return [np.flatnonzero(row).tolist() for row in state.resident]


def test_static_misses_by_hand() -> None:
    """Layer 0 keeps experts {0, 1} of 4, layer 1 {0, 1, 2}: each iteration fetches the active experts outside
    them, and the sets never change."""
    state = _state([[0, 1], [0, 1, 2]], 4, lru=False)
    assert fetch(state, _active([[0, 2, 3], [3]], 4)) == 3
    assert state.fetched.tolist() == [2, 1]
    assert fetch(state, _active([[1], [0, 1, 2]], 4)) == 0
    assert fetch(state, _active([[2, 3], [2, 3]], 4)) == 3  # the same experts again: fetched again
    assert state.fetched.tolist() == [2, 1] and state.counters.tolist() == [3, 3]
    assert _resident(state) == [[0, 1], [0, 1, 2]]


def test_lru_misses_by_hand() -> None:
    """One layer, 4 experts, a cache of 2 holding {0, 1} (never used yet):
    1. {0, 2}: 2 missing; it takes the slot of 1 (used longest ago: never), 0 being in use -> {0, 2}
    2. {1, 2, 3}: 1 and 3 missing; 1 takes 0's slot (last used in 1); 3 finds both slots in use now: streamed
       through -> {1, 2}
    3. {3}: missing; 1 and 2 both last used in 2: the lower index, 1, goes -> {2, 3}
    4. {2, 3}: nothing missing."""
    state = _state([[0, 1]], 4, lru=True)
    expected = [([0, 2], 1, [0, 2]), ([1, 2, 3], 2, [1, 2]), ([3], 1, [2, 3]), ([2, 3], 0, [2, 3])]
    for active, fetched, resident in expected:
        assert fetch(state, _active([active], 4)) == fetched
        assert _resident(state) == [resident]


def test_lru_fills_free_slots_and_a_cache_of_nothing_streams_everything() -> None:
    state = _state([[], []], 3, lru=True, capacity=[2, 0])
    assert fetch(state, _active([[0, 1, 2], [0, 1]], 3)) == 5
    assert _resident(state) == [[0, 1], []]  # 2 streamed through: both slots were in use by then
    assert fetch(state, _active([[0, 1], [0, 1]], 3)) == 2


TERMS = {
    "num_layers": 2.0, "bandwidth_bytes_per_s": 1e12, "kernel_launch_s": 1e-6, "overhead_s": 0.0,
    "expert_bytes": 1e6, "flops_per_assignment": 1e5, "top_k": 2.0, "moe_flops_per_s": 1e12, "moe_launch_s": 2e-6,
}


def _pricing() -> f.Pricing:
    """Roofline experts of 1 MB at 1 TB/s with 2 us of launches, 100 kFLOP per assignment at 1 TFLOP/s."""
    terms = f.terms_array(TERMS)
    packed, table_at = f.packed_tables({})
    counts = np.arange(65, dtype=np.float64)
    return f.Pricing(kind=f.ROOFLINE, terms=np.stack([terms, terms]), tables=packed, table_at=table_at,
                     dense_s=np.stack([counts, counts]), allreduce_s=counts * 0.0, all_to_all_s=counts * 0.0,
                     experts_cache_s=np.full((129, 9), np.nan), ranks=0, rank_kind=f.ROOFLINE)


def test_fetch_time_and_overlap_by_hand() -> None:
    """Two experts of 1 MB at 1 GB/s with 10 us per copy: 2.02 ms. A layer of 4 active experts and 8 assignments
    takes 4 us (1 MB each at 1 TB/s) + 2 us of launches = 6 us; one of them fetched (1.01 ms) overlaps the 3
    resident ones' 4.5 us, so 1.01 ms - 4.5 us is exposed; a layer that fetches nothing exposes nothing."""
    assert f.expert_fetch_s(2.0, 1e6, 1e9, 1e-5) == pytest.approx(2.02e-3, rel=1e-12)
    distinct = np.array([4, 4], dtype=np.int64)
    assignments = np.array([8, 8], dtype=np.int64)
    fetched = np.array([1, 0], dtype=np.int64)
    exposed = f.exposed_fetch_s(_pricing(), distinct, assignments, fetched, 1e9, 1e-5)
    assert exposed == pytest.approx(1.01e-3 - 4.5e-6, rel=1e-12)
    # a link fast enough to hide the copy (1 MB at 1 TB/s: 1 us < 4.5 us) exposes nothing
    assert f.exposed_fetch_s(_pricing(), distinct, assignments, fetched, 1e12, 0.0) == 0.0


# ----- whole runs -------------------------------------------------------------------------------------------------


def _config(offloading: dict | None, policies: list[dict] | None = None, gpu: str = "h100-sxm",
            **simulation: object) -> ExperimentConfig:
    return ExperimentConfig.model_validate({
        "name": "offloading",
        "model": "mixtral-8x7b",
        "hardware": {"profile": gpu, "measured_tables": False},
        "workload": {
            "arrival": {"kind": "poisson", "rate_per_s": 4.0},
            "prompt_tokens": {"kind": "uniform", "low_tokens": 16, "high_tokens": 400},
            "output_tokens": {"kind": "uniform", "low_tokens": 2, "high_tokens": 120},
        },
        "serving": {"max_num_seqs": 32, "gpu_memory_utilization": 0.95},
        "policies": policies or [{"name": "lynx"}],
        **({"offloading": offloading} if offloading is not None else {}),
        "simulation": {"seed": 3, "num_requests": 30, **simulation},
        "output": {"figures": False},
    })


LRU = {"resident_experts_per_layer": 5, "residency": "lru"}


def _run(config: ExperimentConfig) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, float]]:
    setup = prepare(config)
    label, entry, policy = setup.policies[-1]
    run = simulate_policy(setup, label, entry, policy)
    return run.requests, run.iterations, run.summary


def _assert_same_frames(a: pd.DataFrame, b: pd.DataFrame) -> None:
    assert list(a.columns) == list(b.columns) and len(a) == len(b)
    for column in a.columns:
        x, y = ((per_layer(a[column]), per_layer(b[column])) if column in PER_LAYER_COLUMNS
                else (a[column].to_numpy(), b[column].to_numpy()))
        assert ((x == y) | (pd.isna(x) & pd.isna(y))).all(), column


@pytest.fixture(scope="module")
def lru_run() -> tuple[pd.DataFrame, pd.DataFrame, dict[str, float]]:
    return _run(_config(LRU))


def test_every_request_is_accounted_for_and_the_breakdown_adds_up(lru_run) -> None:  # noqa: ANN001
    requests, iterations, summary = lru_run
    assert len(requests) == 30 and (requests["status"] == "finished").all()
    assert (requests["generated_tokens"] == requests["output_tokens"]).all()
    assert iterations["sampled_tokens"].sum() == requests["generated_tokens"].sum()
    parts = iterations[[*BREAKDOWN_COLUMNS, "offload_s"]].sum(axis=1)
    assert np.allclose(parts, iterations["total_s"], rtol=1e-12)
    assert (iterations["total_s"] == iterations["latency_s"]).all()
    fetched = iterations["experts_fetched"].to_numpy()
    distinct = per_layer(iterations["distinct_experts"]).sum(axis=1)
    assert (fetched >= 0).all() and (fetched <= distinct).all() and fetched.sum() > 0
    assert ((iterations["offload_s"] > 0) == (fetched > 0)).all()  # a 352 MB copy is never hidden by 3 experts
    assert 0.0 < summary["offload_share"] < 1.0


def test_runs_are_deterministic(lru_run) -> None:  # noqa: ANN001
    _, iterations, _ = _run(_config(LRU))
    _assert_same_frames(lru_run[1], iterations)


def test_routing_ahead_or_outside_the_loop_changes_nothing(lru_run, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    """The LRU caches advance as iterations are priced: decode runs routed ahead (the default) and one iteration
    at a time give the same records, and so do routing in the loop and routing by the driver."""
    monkeypatch.setattr(compiled_instance, "MAX_RUN_ITERATIONS", 1)
    _, one_at_a_time, _ = _run(_config(LRU))
    _assert_same_frames(lru_run[1], one_at_a_time)
    monkeypatch.undo()
    monkeypatch.setattr(compiled_instance, "fused_routing",
                        lambda step, *args, **kwargs: _placeholder(step.routing.num_moe_layers,
                                                                   step.routing.num_experts))
    _, by_the_driver, _ = _run(_config(LRU))
    _assert_same_frames(lru_run[1], by_the_driver)


def test_every_expert_resident_or_offloading_off_gives_todays_records() -> None:
    """Two policies (sharing top-k unions) on an H200: eight of eight experts resident fetches
    nothing and leaves every record as offloading off writes it, which has no offloading columns."""
    policies = [{"name": "topk"}, {"name": "lynx"}]
    _, off, summary_off = _run(_config(None, policies, "h200"))
    _, everything, summary_all = _run(_config({"resident_experts_per_layer": 8, "residency": "lru"}, policies, "h200"))
    assert not set(OFFLOAD_COLUMNS) & set(off.columns) and "offload_share" not in summary_off
    assert (everything["experts_fetched"] == 0).all() and (everything["offload_s"] == 0).all()
    _assert_same_frames(off, everything.drop(columns=list(OFFLOAD_COLUMNS)))
    assert summary_all["offload_share"] == 0.0


def test_static_residency_keeps_the_most_popular_experts_and_frees_kv_memory() -> None:
    setup = prepare(_config({"host_expert_bytes": 19e9}))
    offloading = setup.offloading
    assert offloading is not None and not offloading.lru
    # 19 GB is 54 experts of 352 MB: one from each of the 32 layers, a second from the last 22
    assert offloading.capacity.tolist() == [7] * 10 + [6] * 22
    assert offloading.resident.sum(axis=1).tolist() == offloading.capacity.tolist()
    # the GPU keeps 202 experts and a staging buffer of 2: 52 experts' bytes go to the KV cache
    model = setup.model
    assert host_expert_bytes(setup.config, model, setup.hardware) == 52 * model.expert_bytes
    with pytest.raises(InputError, match="do not fit"):
        prepare(_config(None))  # without offloading Mixtral's 93 GB do not fit in 80 GB


@pytest.mark.parametrize(("offloading", "simulation", "problem"), [
    ({"resident_experts_per_layer": 4}, {"routing_mode": "statistical"}, "needs exact routing"),
    ({"resident_experts_per_layer": 9}, {}, "more than the model's 8 experts"),
    ({"resident_experts": [[0, 1]]}, {}, "has 1 lists, the model 32 MoE layers"),
    ({"host_expert_bytes": 1e12}, {}, "more than the model's 256 experts"),
])
def test_offloading_that_cannot_apply_is_refused_in_one_line(offloading: dict, simulation: dict,
                                                             problem: str) -> None:
    with pytest.raises(InputError, match=problem) as raised:
        prepare(_config(offloading, **simulation))
    assert raised.value.where.startswith("offloading") and "\n" not in str(raised.value)


@pytest.mark.parametrize("section", [{}, {"resident_experts_per_layer": 4, "host_expert_bytes": 1e9},
                                     {"resident_experts": [[1, 1]]}, {"residency": "fifo",
                                                                      "resident_experts_per_layer": 4}])
def test_a_malformed_offloading_section_is_refused(section: dict) -> None:
    with pytest.raises(ValueError, match="offloading"):
        _config(section)
