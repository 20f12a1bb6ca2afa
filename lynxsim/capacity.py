"""The highest arrival rate at which a policy still meets the latency SLO: serving capacity under an SLO.

Capacity, not latency at one load, is what a serving engineer buys GPUs by, and a policy that shortens decode
iterations raises it. For each policy the search runs that policy alone on the experiment at one arrival rate
after another: from the experiment's own rate it doubles (or halves) until it brackets the SLO boundary, then
bisects geometrically until the bracket is within ``rel_tolerance``. With one seed the arrivals at rate ``r`` are
the same draws rescaled, so attainment falls with rate almost monotonically and the bisection converges. Each
probe generates arrivals for ``simulation.duration_s`` (so every rate loads the server for the same time) and
drains them; requests arriving during ``warmup_s`` are left out of the attainment. A rate counts only while the
server keeps up: the p99 wait from arrival to first scheduling must stay under ``slo.max_scheduling_delay_s``
(5 s by default, Vidur's criterion), since an overloaded server with a full batch can keep TPOT low while its
queue grows without bound.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from lynxsim.config import ExperimentConfig
from lynxsim.errors import InputError
from lynxsim.runner import PolicyRun, prepare, simulate_policy
from lynxsim.workload.arrivals import GammaArrivals, PoissonArrivals, TraceArrivals

MAX_BRACKET_STEPS = 10
"""Doublings or halvings tried before giving up: a factor of 1,024 either way from the experiment's rate."""


@dataclass(frozen=True)
class CapacityProbe:
    """One simulation of the search: the rate tried and what it gave."""

    rate_per_s: float
    slo_attainment: float
    meets_slo: bool
    summary: dict[str, float]


@dataclass(frozen=True)
class PolicyCapacity:
    """``rate_per_s``: the highest rate found that meets the SLO (0 if even the lowest tried does not)."""

    label: str
    rate_per_s: float
    probes: list[CapacityProbe]

    @property
    def at_capacity(self) -> CapacityProbe | None:
        meeting = [p for p in self.probes if p.meets_slo and p.rate_per_s == self.rate_per_s]
        return meeting[0] if meeting else None


def with_arrival_rate(config: ExperimentConfig, rate_per_s: float) -> ExperimentConfig:
    """``config`` with its arrivals at ``rate_per_s``: the rate of Poisson and gamma arrivals, the target mean
    rate of a replayed trace."""
    arrival = config.workload.arrival
    changed: PoissonArrivals | GammaArrivals | TraceArrivals
    if isinstance(arrival, (PoissonArrivals, GammaArrivals)):
        changed = arrival.model_copy(update={"rate_per_s": rate_per_s})
    elif isinstance(arrival, TraceArrivals):
        changed = arrival.model_copy(update={"rate_per_s": rate_per_s, "speedup": None})
    else:
        raise InputError("workload.arrival.kind", f"capacity search needs a rate to vary; '{arrival.kind}' has none")
    return config.model_copy(update={"workload": config.workload.model_copy(update={"arrival": changed})})


def starting_rate(config: ExperimentConfig) -> float:
    """The experiment's own arrival rate: the configured one, or a replayed trace's mean rate."""
    arrival = config.workload.arrival
    rate = getattr(arrival, "rate_per_s", None)
    if rate is not None:
        return float(rate)
    requests = prepare(config).requests
    span_s = requests[-1].arrival_s - requests[0].arrival_s if len(requests) > 1 else 0.0
    if span_s <= 0:
        raise InputError("workload.arrival", "the workload has no arrival rate to start the search from")
    return (len(requests) - 1) / span_s


def find_capacity(
    config: ExperimentConfig,
    policy_index: int,
    *,
    rel_tolerance: float = 0.02,
    on_probe: Callable[[str, CapacityProbe], None] | None = None,
) -> PolicyCapacity:
    """Search the capacity of ``config.policies[policy_index]`` under ``config.slo``."""
    if not config.slo.has_target:
        raise InputError("slo", "capacity search needs a target: set slo.tpot_s and/or slo.ttft_s")
    if config.simulation.duration_s is None:
        raise InputError(
            "simulation.duration_s",
            "capacity search needs arrivals over a fixed duration, so that every rate tried loads the server for "
            "the same time (a fixed request count would arrive ever faster, all of it inside the warm-up)",
        )
    if not 0 < rel_tolerance < 1:
        raise InputError("--tolerance", "must be between 0 and 1")
    entry = config.policies[policy_index]
    label = entry.label or entry.name
    alone = config.model_copy(update={"policies": [entry]})
    probes: list[CapacityProbe] = []

    def probe(rate: float) -> CapacityProbe:
        setup = prepare(with_arrival_rate(alone, rate))
        _, policy_entry, policy = setup.policies[0]
        run: PolicyRun = simulate_policy(setup, label, policy_entry, policy)
        attainment = run.summary["slo_attainment"]  # NaN when no request arrived after warm-up: no evidence, a miss
        sustainable = run.summary["scheduling_delay_p99_s"] <= config.slo.max_scheduling_delay_s
        meets = bool(attainment >= config.slo.attainment and sustainable)
        result = CapacityProbe(rate, attainment, meets, run.summary)
        probes.append(result)
        if on_probe is not None:
            on_probe(label, result)
        return result

    rate = starting_rate(alone)
    first = probe(rate)
    low, high = (rate, None) if first.meets_slo else (None, rate)
    for _ in range(MAX_BRACKET_STEPS):
        if low is not None and high is not None:
            break
        if high is None:
            assert low is not None
            candidate = probe(low * 2.0)
            low, high = (candidate.rate_per_s, None) if candidate.meets_slo else (low, candidate.rate_per_s)
        else:
            candidate = probe(high / 2.0)
            low, high = (candidate.rate_per_s, high) if candidate.meets_slo else (None, candidate.rate_per_s)
    if low is None or high is None:
        return PolicyCapacity(label, low or 0.0, probes)
    while high / low - 1.0 > rel_tolerance:
        middle = (low * high) ** 0.5
        if probe(middle).meets_slo:
            low = middle
        else:
            high = middle
    return PolicyCapacity(label, low, probes)
