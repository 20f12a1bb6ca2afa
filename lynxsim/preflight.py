"""What a run will need, estimated from its config before anything is generated: a run that cannot fit in this
machine's memory is refused with one line naming the key to change, instead of being killed (or swapping for
hours) after it has drawn millions of requests; and one whose simulation may take longer than
``simulation.max_wall_s`` (a day by default), bounded from measured speeds once its requests are drawn, likewise.

The estimate is an upper bound built from measured costs per request and per routing scratch slot, not a model of
the whole run: it is meant to catch the orders of magnitude a typo makes (``num_requests: 1e8``), not to predict a
run's peak to the megabyte.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from lynxsim.config import ExperimentConfig
from lynxsim.datatypes import RequestTable
from lynxsim.errors import InputError
from lynxsim.models import ModelSpec
from lynxsim.workload.arrivals import GammaArrivals, ListArrivals, PoissonArrivals, generous_count

REQUEST_BYTES = 2048
"""Memory per request and policy held until the run ends: its columns, the engine's rows and its records. Measured
at about 0.9 KB for two policies on requests of a few tokens (300,000 requests: 184 MB above 100,000 requests'
peak, quickstart with 8-token prompts and 4-token outputs), rounded up to 2 KB a policy for the iteration and
layer records that longer requests add."""
BASE_BYTES = 400 * 2**20
"""The interpreter, numpy, numba's compiled engine and the model's tables: a quickstart's peak, rounded up."""
LOGITS_BYTES = 4
"""float32 router logits: the exact routing's scratch holds one per (layer, token of the largest batch, expert)."""
MEMORY_SHARE = 0.8
"""The share of the memory available now that a run may plan to use."""
WALL_S_PER_OUTPUT_TOKEN_LAYER = {"exact": 160e-9, "statistical": 10e-9}
"""Wall time per output token, MoE layer and policy, the most measured on this project's 2-core machine
(benchmarks/results/speed_2026-12-06c.md; the Azure conversation trace: 4.09 million output tokens, Mixtral's 32
layers): exact routing in 160 ns (S1r, 4 replicas: decode batches of about 5 tokens, the slowest per token; one
instance, S1, takes 28 ns), statistical in 4.7 ns (S1s), rounded up to 10 ns for its table building."""


@dataclass(frozen=True)
class Estimate:
    """A run's expected request count (None: set by a trace or list, which is in memory already) and peak bytes."""

    requests: int | None
    peak_bytes: int


def estimate(config: ExperimentConfig, model: ModelSpec) -> Estimate:
    """The requests ``config`` draws (bounded by its cut-off, since none arrive after it) and an upper bound of
    its peak memory."""
    requests = expected_requests(config)
    instances = len(config.deployment.roles)
    scratch = 0
    if config.simulation.routing_mode == "exact":
        scratch = instances * model.num_moe_layers * config.serving.max_num_batched_tokens * model.num_experts
        scratch *= LOGITS_BYTES
    peak = BASE_BYTES + scratch + (requests or 0) * len(config.policies) * REQUEST_BYTES
    return Estimate(requests, peak)


def wall_time_s(config: ExperimentConfig, model: ModelSpec, requests: RequestTable) -> float:
    """An upper bound of the simulation's wall time: every output token of ``requests``, in every MoE layer, for
    every policy, at the slowest measured speed of the routing mode (``WALL_S_PER_OUTPUT_TOKEN_LAYER``)."""
    per_token_s = WALL_S_PER_OUTPUT_TOKEN_LAYER[config.simulation.routing_mode] * model.num_moe_layers
    return float(requests.output_tokens.sum()) * len(config.policies) * per_token_s


def check_wall_time(config: ExperimentConfig, model: ModelSpec, requests: RequestTable) -> float:
    """``wall_time_s``, refused (``InputError``) past ``simulation.max_wall_s``: once the requests are drawn (as
    columns, a second for ten million), their output tokens are known, whatever their source."""
    wall_s = wall_time_s(config, model, requests)
    limit_s = config.simulation.max_wall_s
    if wall_s > limit_s:
        tokens = int(requests.output_tokens.sum())
        raise InputError(_count_key(config), f"{len(requests):,} requests ({tokens:,} output tokens) may take up to "
                         f"{wall_s / 3600:,.1f} h to simulate, past simulation.max_wall_s ({limit_s / 3600:,.1f} h): "
                         "draw fewer, stop earlier (cutoff_s), or raise max_wall_s")
    return wall_s


def expected_requests(config: ExperimentConfig) -> int | None:
    """How many requests a renewal arrival process draws: ``num_requests``, else as many as its first draw holds
    over the time bound (``arrivals.generous_count``); capped by what arrives before the cut-off. None for list
    and trace arrivals, whose requests are already in memory as the config or a file."""
    arrival = config.workload.arrival
    sim = config.simulation
    if isinstance(arrival, ListArrivals):
        return len(arrival.times_s)
    if not isinstance(arrival, (PoissonArrivals, GammaArrivals)):
        return sim.num_requests
    cv = arrival.cv if isinstance(arrival, GammaArrivals) else 1.0
    bounds = [b for b in (sim.duration_s, sim.cutoff_s) if b is not None]
    by_time = generous_count(arrival.rate_per_s, cv, min(bounds)) if bounds else math.inf
    count = min(sim.num_requests if sim.num_requests is not None else math.inf, by_time)
    return int(count) if math.isfinite(count) else None


def available_bytes() -> int | None:
    """Memory the system can give a process now (``MemAvailable``), or its physical memory; None if unknown."""
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(config: ExperimentConfig, model: ModelSpec, available: int | None = None) -> Estimate:
    """``estimate``, refused (``InputError`` naming the key that drives it) when it exceeds ``MEMORY_SHARE`` of
    ``available`` bytes (default: ``available_bytes()``)."""
    found = estimate(config, model)
    limit = available if available is not None else available_bytes()
    if limit is None or found.peak_bytes <= MEMORY_SHARE * limit:
        return found
    need, have = found.peak_bytes / 1e9, limit / 1e9
    if found.requests is not None and found.requests * len(config.policies) * REQUEST_BYTES > found.peak_bytes / 2:
        key = _count_key(config)
        problem = (f"{found.requests:,} requests need about {need:,.1f} GB of memory and {have:,.1f} GB is "
                   "available: draw fewer (num_requests, duration_s) or stop earlier (cutoff_s)")
    else:
        key = "serving.max_num_batched_tokens"
        problem = (f"exact routing of {config.serving.max_num_batched_tokens:,}-token batches needs about "
                   f"{need:,.1f} GB of memory and {have:,.1f} GB is available: lower it, or route statistically")
    raise InputError(key, problem)


def _count_key(config: ExperimentConfig) -> str:
    """The key that sets how many requests a run draws, for a refusal to name."""
    return "simulation.num_requests" if config.simulation.num_requests is not None else "simulation.duration_s"
