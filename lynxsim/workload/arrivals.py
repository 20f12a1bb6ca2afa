"""Arrival processes: the times at which requests reach the server."""

from __future__ import annotations

from typing import Annotated, Literal, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field


class PoissonArrivals(BaseModel):
    """Independent arrivals at a constant mean rate (exponential inter-arrival times): the usual open-loop
    load model of serving benchmarks (vLLM's benchmark_serving uses it by default)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["poisson"] = "poisson"
    rate_per_s: float = Field(gt=0, description="mean arrivals per second")

    def times_s(self, rng: np.random.Generator, num_requests: int | None, duration_s: float | None) -> np.ndarray:
        """Arrival times from 0: exactly ``num_requests`` of them, or all that fall before ``duration_s``."""
        if num_requests is not None:
            return np.cumsum(rng.exponential(1.0 / self.rate_per_s, size=num_requests))
        assert duration_s is not None
        expected = self.rate_per_s * duration_s
        draws = int(expected + 10.0 * np.sqrt(expected) + 16)
        times = np.cumsum(rng.exponential(1.0 / self.rate_per_s, size=draws))
        while times[-1] < duration_s:  # the generous first draw almost never falls short
            more = np.cumsum(rng.exponential(1.0 / self.rate_per_s, size=draws)) + times[-1]
            times = np.concatenate([times, more])
        return times[times < duration_s]


class ListArrivals(BaseModel):
    """Arrivals at explicitly given times: for hand-made scenarios and tests."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["list"] = "list"
    times_s: list[Annotated[float, Field(ge=0)]] = Field(min_length=1)

    def times_s_array(self) -> np.ndarray:
        return np.sort(np.asarray(self.times_s, dtype=float))


ArrivalProcess = Annotated[Union[PoissonArrivals, ListArrivals], Field(discriminator="kind")]
