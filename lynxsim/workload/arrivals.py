"""Arrival processes: the times at which requests reach the server.

``poisson`` and ``gamma`` are renewal processes (independent, identically distributed inter-arrival times) drawn
from the seed; ``list`` gives the times by hand; ``trace`` replays a recorded trace's timestamps, optionally sped
up or slowed down (one factor for the whole trace, so its bursts keep their shape).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from lynxsim.errors import InputError
from lynxsim.workload.traces import RequestTrace, TraceFile, mean_rate_per_s


def generous_count(rate_per_s: float, cv: float, seconds: float) -> int:
    """More arrivals than a renewal process of this rate and coefficient of variation almost ever makes in
    ``seconds``: the expected count plus ten of its standard deviations (and 16). A first draw this long
    seldom falls short (``_renewal_times``); ``lynxsim.preflight`` sizes a run's memory by it."""
    expected = rate_per_s * seconds
    return int(expected + 10.0 * max(cv, 1.0) * math.sqrt(expected) + 16)


def _renewal_times(
    draw: Callable[[int], np.ndarray], rate_per_s: float, cv: float, num_requests: int | None, duration_s: float | None,
    until_s: float | None = None,
) -> np.ndarray:
    """Arrival times from 0 of a renewal process whose gaps ``draw(n)`` returns: exactly ``num_requests`` of them,
    or all that fall before ``duration_s``; with ``until_s`` (the cut-off, after which nothing is served), only
    those before it. Gaps are drawn in chunks until the times pass the bound: the times are those of one long draw
    (numpy's generators draw each gap from the stream in turn), so the bound changes how many, never which."""
    bound = min(b for b in (duration_s, until_s, math.inf) if b is not None)
    if num_requests is not None and bound == math.inf:
        return np.cumsum(draw(num_requests))
    assert num_requests is not None or duration_s is not None
    most = math.inf if num_requests is None else num_requests
    chunk = generous_count(rate_per_s, cv, bound)
    parts = [np.cumsum(draw(int(min(chunk, most))))]
    drawn = parts[0].size
    while parts[-1][-1] < bound and drawn < most:
        size = int(min(chunk, most - drawn))
        parts.append(np.cumsum(draw(size)) + parts[-1][-1])
        drawn += size
    times = np.concatenate(parts)
    return times[times < bound]


class PoissonArrivals(BaseModel):
    """Independent arrivals at a constant mean rate (exponential inter-arrival times): the usual open-loop
    load model of serving benchmarks (vLLM's benchmark_serving uses it by default)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["poisson"] = "poisson"
    rate_per_s: float = Field(gt=0, description="mean arrivals per second")

    def times_s(self, rng: np.random.Generator, num_requests: int | None, duration_s: float | None,
                until_s: float | None = None) -> np.ndarray:
        """Arrival times from 0: exactly ``num_requests`` of them, or all that fall before ``duration_s``; none
        at or after ``until_s``."""
        return _renewal_times(lambda n: rng.exponential(1.0 / self.rate_per_s, size=n), self.rate_per_s, 1.0,
                              num_requests, duration_s, until_s)


class GammaArrivals(BaseModel):
    """Renewal arrivals with gamma-distributed inter-arrival times of mean ``1 / rate_per_s`` and coefficient of
    variation ``cv`` (standard deviation over mean): ``cv > 1`` is burstier than Poisson, ``cv < 1`` more regular,
    ``cv = 1`` is Poisson (an exponential is a gamma of shape 1). Shape ``1 / cv**2``, scale ``cv**2 / rate``.
    (vLLM's benchmark_serving calls ``1 / cv**2`` its ``burstiness``.)"""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["gamma"] = "gamma"
    rate_per_s: float = Field(gt=0, description="mean arrivals per second")
    cv: float = Field(gt=0, description="coefficient of variation of the inter-arrival times (1 = Poisson)")

    def times_s(self, rng: np.random.Generator, num_requests: int | None, duration_s: float | None,
                until_s: float | None = None) -> np.ndarray:
        shape = 1.0 / self.cv**2
        scale = self.cv**2 / self.rate_per_s
        return _renewal_times(lambda n: rng.gamma(shape, scale, size=n), self.rate_per_s, self.cv, num_requests,
                              duration_s, until_s)


class ListArrivals(BaseModel):
    """Arrivals at explicitly given times: for hand-made scenarios and tests."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["list"] = "list"
    times_s: list[Annotated[float, Field(ge=0)]] = Field(min_length=1)

    def times_s_array(self) -> np.ndarray:
        return np.sort(np.asarray(self.times_s, dtype=float))


class TraceArrivals(TraceFile):
    """Replay of a trace's arrival times (seconds from its first request), from ``start_s`` on (trace time),
    scaled by one factor: ``speedup`` divides every time; ``rate_per_s`` picks the factor that gives that mean
    rate, ``(requests - 1) / span``, over the trace from ``start_s`` to its end. Neither: the recorded times."""

    kind: Literal["trace"] = "trace"
    speedup: float | None = Field(
        default=None, gt=0, description="divide the trace's times by this (2 = twice the rate)"
    )
    rate_per_s: float | None = Field(
        default=None, gt=0, description="scale the trace's times to this mean arrival rate"
    )
    start_s: float = Field(
        default=0.0, ge=0, description="skip requests that arrive earlier (trace time, before scaling)"
    )

    @model_validator(mode="after")
    def _one_scaling(self) -> TraceArrivals:
        if self.speedup is not None and self.rate_per_s is not None:
            raise ValueError("give at most one of 'speedup' and 'rate_per_s' (both scale the trace's times)")
        if self.columns is not None and self.columns.arrival is None:
            raise ValueError("trace arrivals need the arrival time column: map columns.arrival")
        return self

    def select(
        self, trace: RequestTrace, num_requests: int | None, duration_s: float | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(times_s, rows)``: the scaled arrival times from 0 (the window start) and the trace rows they are,
        the first ``num_requests`` of them and those before ``duration_s`` (scaled time), where given."""
        if trace.arrival_s is None:
            raise InputError(trace.source, "the trace has no arrival times (map columns.arrival)")
        first = int(np.searchsorted(trace.arrival_s, self.start_s, side="left"))
        if first == len(trace):
            raise InputError(
                trace.source, f"start_s {self.start_s:g} s is after the trace's last arrival ({trace.span_s:.3f} s)"
            )
        times = trace.arrival_s[first:] - self.start_s
        times = times * self.time_factor(trace.arrival_s[first:], trace.source)
        rows = np.arange(first, len(trace))
        if num_requests is not None:
            times, rows = times[:num_requests], rows[:num_requests]
        if duration_s is not None:
            keep = times < duration_s
            times, rows = times[keep], rows[keep]
        return times, rows

    def time_factor(self, arrival_s: np.ndarray, source: str = "") -> float:
        """What every (window) time is multiplied by."""
        if self.speedup is not None:
            return 1.0 / self.speedup
        if self.rate_per_s is not None:
            rate = mean_rate_per_s(arrival_s)
            if not np.isfinite(rate):
                raise InputError(source, "rate_per_s needs at least two arrivals at different times in the trace")
            return rate / self.rate_per_s
        return 1.0


class ThinkTime(BaseModel):
    """How long a closed-loop client waits between its request's end and its next request: ``fixed`` (every wait
    ``mean_s``), or ``exponential`` with mean ``mean_s`` (a user reading the answer for a random time)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["fixed", "exponential"] = "fixed"
    mean_s: float = Field(default=0.0, ge=0, description="the mean wait (s); 0: the next request at once")

    def sample(self, rng: np.random.Generator, count: int) -> np.ndarray:
        if self.kind == "exponential" and self.mean_s > 0:
            return rng.exponential(self.mean_s, size=count)
        return np.full(count, self.mean_s)


class ClosedLoopArrivals(BaseModel):
    """``clients`` clients, each with one request in flight: it sends its next request when its last one ends
    (finished, or rejected on arrival) plus a think time, as a benchmark capped at a concurrency does (vLLM's
    benchmark_serving ``--max-concurrency``, evaluation harnesses with a fixed number of workers). Every client
    sends its first request at time 0. The requests, ``simulation.num_requests`` of them, go out in the order the
    clients send them; a send at or after ``simulation.duration_s`` (if given) does not happen. Arrival times
    are therefore known only as the simulation runs (``lynxsim.engine.compiled.orchestrator``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["closed_loop"] = "closed_loop"
    clients: int = Field(gt=0, le=1 << 16, description="requests in flight at most (one per client)")
    think_time: ThinkTime = Field(default_factory=ThinkTime, description="wait between a response and the next send")


class BatchArrivals(BaseModel):
    """Every request at time 0: an offline batch job (``simulation.num_requests`` of them)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["batch"] = "batch"


ArrivalProcess = Annotated[
    PoissonArrivals | GammaArrivals | ListArrivals | TraceArrivals | ClosedLoopArrivals | BatchArrivals,
    Field(discriminator="kind"),
]
