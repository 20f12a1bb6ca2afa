"""Expert offloading inside the compiled loop: each instance's resident experts, and each iteration's fetches.

The loop calls ``fetch_and_price`` once per iteration, when it prices it, in iteration order: a decode run is routed
ahead (its rows wait in the routing buffers), but the resident sets advance only as its iterations are priced, so
an LRU cache sees exactly the iterations that ran, in the order they ran. The active experts come from the routing
rows' tokens per expert: ``routing.FusedRouting.counts`` where the loop routes, ``Residency.active`` where the
driver does (``RoutingStep.exact_activities`` fills it). ``lynxsim.engine.offloading`` states the model.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from lynxsim.cost_formulas import Pricing, exposed_fetch_s
from lynxsim.engine.decode_run import MAX_RUN_ITERATIONS
from lynxsim.engine.offloading import ExpertOffloading
from lynxsim.jit import compiled


class Residency(NamedTuple):
    """One instance's offloading state (``enabled`` False: no offloading; the arrays are placeholders of the same
    types, so that the loop is compiled once)."""

    enabled: bool
    lru: bool
    resident: np.ndarray  # bool [L, E]: in GPU memory now
    last_used: np.ndarray  # int64 [L, E]: the iteration (from 1) each expert was last active; 0: not since the start
    capacity: np.ndarray  # int64 [L]: resident experts each layer keeps (LRU: its cache's slots)
    fetched: np.ndarray  # int64 [L] scratch: the priced iteration's experts fetched per layer
    active: np.ndarray  # int32 [MAX_RUN_ITERATIONS, L, E]: tokens per expert of the driver's routing rows
    host_bytes_per_s: float
    latency_s: float
    counters: np.ndarray  # int64 [2]: iterations priced, the last one's experts fetched (all layers)
    exposed_s: np.ndarray  # float64 [1]: the last priced iteration's exposed fetch time


def residency(offloading: ExpertOffloading | None, num_layers: int, num_experts: int) -> Residency:
    """A fresh instance's state for ``offloading`` (its starting resident sets), or the disabled placeholder."""
    if offloading is None:
        return Residency(False, False, np.zeros((1, 1), dtype=np.bool_), np.zeros((1, 1), dtype=np.int64),
                         np.zeros(1, dtype=np.int64), np.zeros(1, dtype=np.int64),
                         np.zeros((1, 1, 1), dtype=np.int32), 1.0, 0.0, np.zeros(2, dtype=np.int64), np.zeros(1))
    return Residency(True, offloading.lru, np.array(offloading.resident, dtype=np.bool_),
                     np.zeros((num_layers, num_experts), dtype=np.int64), np.array(offloading.capacity, dtype=np.int64),
                     np.zeros(num_layers, dtype=np.int64),
                     np.zeros((MAX_RUN_ITERATIONS, num_layers, num_experts), dtype=np.int32),
                     offloading.host_bytes_per_s, offloading.latency_s, np.zeros(2, dtype=np.int64), np.zeros(1))


@compiled(cache=True)
def fetch(state: Residency, active: np.ndarray) -> int:
    """One iteration's fetches (``active``: tokens per expert ``[L, E]``, an expert is active with one or more):
    per layer the active experts not resident into ``state.fetched``; under LRU the resident sets updated (each
    active resident expert's last use now; each fetched expert, in index order, into a free slot or the slot of the
    least recently used expert not active now, ties to the lower index, or streamed through where none is free).
    Returns the experts fetched over every layer."""
    state.counters[0] += 1
    now = state.counters[0]
    num_layers, num_experts = state.resident.shape
    total = 0
    for layer in range(num_layers):
        missing = 0
        for e in range(num_experts):
            if active[layer, e] > 0:
                if state.resident[layer, e]:
                    state.last_used[layer, e] = now
                else:
                    missing += 1
        state.fetched[layer] = missing
        total += missing
        if not state.lru or missing == 0:
            continue
        held = 0
        for e in range(num_experts):
            held += state.resident[layer, e]
        for e in range(num_experts):
            if active[layer, e] <= 0 or state.resident[layer, e]:
                continue
            if held < state.capacity[layer]:
                held += 1
            else:
                victim = -1
                oldest = now
                for v in range(num_experts):
                    if state.resident[layer, v] and state.last_used[layer, v] < oldest:
                        victim = v
                        oldest = state.last_used[layer, v]
                if victim < 0:  # every resident expert is active now: this one streams through
                    continue
                state.resident[layer, victim] = False
            state.resident[layer, e] = True
            state.last_used[layer, e] = now
    state.counters[1] = total
    return total


@compiled(cache=True)
def fetch_and_price(state: Residency, pricing: Pricing, active: np.ndarray, distinct: np.ndarray,
                    assignments: np.ndarray) -> float:
    """``fetch`` for the iteration being priced, and its exposed fetch time (``cost_formulas.exposed_fetch_s``
    of its ``distinct`` experts and ``assignments`` per layer), also kept in ``state.exposed_s``."""
    fetch(state, active)
    exposed = exposed_fetch_s(pricing, distinct, assignments, state.fetched, state.host_bytes_per_s, state.latency_s)
    state.exposed_s[0] = exposed
    return exposed
