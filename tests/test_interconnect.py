"""Collective costs: measured tables (log-log interpolation, latency floor, bandwidth beyond the largest size)
and the latency-bandwidth model where no table exists."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from lynxsim.hardware import load_hardware
from lynxsim.interconnect import CollectiveCost, CollectiveTable, wire_fraction

TABLE = CollectiveTable(op="all_reduce", gpus=2, bytes=[1000, 4000, 16000], time_s=[10e-6, 20e-6, 80e-6], source="test")
BW = 1e11


def test_hand_worked_collective_times() -> None:
    cost = CollectiveCost([TABLE], gpus=2, latency_s=5e-6, bandwidth_bytes_per_s=BW)
    got = cost.time_s("all_reduce", [0, 500, 1000, 2000, 4000, 16000, 26000])
    # 2000 B is halfway between 1000 and 4000 in log(bytes): the geometric mean of 10 and 20 us
    # 26000 B: 80 us + the 10000 extra bytes, on the wire 2 (2 - 1) / 2 = 1x, at 1e11 B/s = 80 + 0.1 us
    assert got == pytest.approx([0.0, 10e-6, 10e-6, math.sqrt(10e-6 * 20e-6), 20e-6, 80e-6, 80.1e-6])
    assert cost.measured("all_reduce") and not cost.measured("all_to_all")
    # no all-to-all table: latency + (g - 1) / g of the buffer over the bandwidth
    assert cost.time_s("all_to_all", [2e6]) == pytest.approx([5e-6 + 0.5 * 2e6 / BW])
    # another GPU count has no table either
    four = CollectiveCost([TABLE], gpus=4, latency_s=5e-6, bandwidth_bytes_per_s=BW)
    assert four.time_s("all_reduce", [4000]) == pytest.approx([5e-6 + 1.5 * 4000 / BW])
    assert wire_fraction("all_reduce", 8) == pytest.approx(1.75) and wire_fraction("all_to_all", 8) == 0.875


@given(st.lists(st.floats(1.0, 1e9), min_size=2, max_size=20))
def test_measured_times_never_fall_as_buffers_grow_when_the_table_rises(sizes: list[float]) -> None:
    cost = CollectiveCost([TABLE], gpus=2, latency_s=5e-6, bandwidth_bytes_per_s=BW)
    ordered = np.sort(np.asarray(sizes))
    assert (np.diff(cost.time_s("all_reduce", ordered)) >= -1e-18).all()


def test_tables_are_validated() -> None:
    with pytest.raises(ValidationError, match="strictly increasing"):
        CollectiveTable(op="all_reduce", gpus=2, bytes=[4000, 1000], time_s=[1e-5, 2e-5], source="x")
    with pytest.raises(ValidationError, match="entries"):
        CollectiveTable(op="all_reduce", gpus=2, bytes=[1000, 4000, 9000], time_s=[1e-5, 2e-5], source="x")
    with pytest.raises(ValidationError):
        CollectiveTable(op="broadcast", gpus=2, bytes=[1000, 4000], time_s=[1e-5, 2e-5], source="x")
    h200 = load_hardware("h200")
    twice = [*h200.collectives, h200.collectives[0]]
    with pytest.raises(ValidationError, match="same"):
        type(h200).model_validate({**h200.model_dump(), "collectives": [t.model_dump() for t in twice]})


def test_the_h200_profile_prices_two_gpu_collectives_from_its_in_graph_measurements() -> None:
    h200 = load_hardware("h200")
    two = h200.collective_cost(2)
    assert two.measured("all_reduce") and two.measured("all_to_all")
    # one decode token of a 4096-wide model: ~14 us in a graph, half the 24 us of eager launches
    assert 10e-6 < float(two.time_s("all_reduce", 8192)) < 16e-6
    assert not h200.collective_cost(8).measured("all_reduce")
