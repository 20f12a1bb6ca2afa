"""Workloads: when requests arrive and how long their prompts and outputs are."""

from lynxsim.workload.arrivals import ArrivalProcess, ListArrivals, PoissonArrivals
from lynxsim.workload.lengths import FixedLength, LengthDistribution, LognormalLength, UniformLength
from lynxsim.workload.requests import RequestSpec, generate_requests

__all__ = [
    "ArrivalProcess",
    "FixedLength",
    "LengthDistribution",
    "ListArrivals",
    "LognormalLength",
    "PoissonArrivals",
    "RequestSpec",
    "UniformLength",
    "generate_requests",
]
