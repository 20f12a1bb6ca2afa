"""Workloads: when requests arrive and how long their prompts and outputs are."""

from lynxsim.datatypes import RequestSpec, RequestTable
from lynxsim.workload.arrivals import ArrivalProcess, GammaArrivals, ListArrivals, PoissonArrivals, TraceArrivals
from lynxsim.workload.lengths import (
    EmpiricalLength,
    FixedLength,
    LengthDistribution,
    LognormalLength,
    PairedLengths,
    TaskLength,
    UniformLength,
)
from lynxsim.workload.requests import generate_requests
from lynxsim.workload.traces import (
    RequestTrace,
    TraceColumns,
    TraceFile,
    TraceNote,
    load_azure_csv,
    load_mooncake_jsonl,
    load_trace,
    load_trace_table,
)

__all__ = [
    "ArrivalProcess",
    "EmpiricalLength",
    "FixedLength",
    "GammaArrivals",
    "LengthDistribution",
    "ListArrivals",
    "LognormalLength",
    "PairedLengths",
    "PoissonArrivals",
    "RequestSpec",
    "RequestTable",
    "TaskLength",
    "RequestTrace",
    "TraceArrivals",
    "TraceColumns",
    "TraceFile",
    "TraceNote",
    "UniformLength",
    "generate_requests",
    "load_azure_csv",
    "load_mooncake_jsonl",
    "load_trace",
    "load_trace_table",
]
