"""The list of requests a run serves, drawn once so that every policy sees the same arrivals."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lynxsim.workload.arrivals import ListArrivals, PoissonArrivals
from lynxsim.workload.lengths import FixedLength, LognormalLength, UniformLength


@dataclass(frozen=True)
class RequestSpec:
    """What arrives: when, and how many prompt tokens it brings and output tokens it will generate."""

    request_id: int
    arrival_s: float
    prompt_tokens: int
    output_tokens: int


def generate_requests(
    arrival: PoissonArrivals | ListArrivals,
    prompt_tokens: FixedLength | UniformLength | LognormalLength,
    output_tokens: FixedLength | UniformLength | LognormalLength,
    *,
    seed: int,
    num_requests: int | None = None,
    duration_s: float | None = None,
) -> list[RequestSpec]:
    """Draw the requests of one run. Arrival times, prompt lengths and output lengths each use their own
    child stream of ``seed``, so changing one distribution leaves the other two unchanged."""
    arrival_rng, prompt_rng, output_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))
    if isinstance(arrival, ListArrivals):
        times_s = arrival.times_s_array()
        if num_requests is not None:
            times_s = times_s[:num_requests]
        if duration_s is not None:
            times_s = times_s[times_s < duration_s]
    else:
        times_s = arrival.times_s(arrival_rng, num_requests, duration_s)
    count = len(times_s)
    prompts = prompt_tokens.sample(prompt_rng, count)
    outputs = output_tokens.sample(output_rng, count)
    return [
        RequestSpec(request_id=i, arrival_s=float(t), prompt_tokens=int(p), output_tokens=int(o))
        for i, (t, p, o) in enumerate(zip(times_s, prompts, outputs))
    ]
