"""Where router logits come from: the ``RoutingSource`` contract and its implementations."""

from lynxsim.routing.base import RoutingSource
from lynxsim.routing.flame import import_flame, load_flame_csv_dir
from lynxsim.routing.replay import TraceReplayRouting
from lynxsim.routing.synthetic import SyntheticRouting, SyntheticRoutingParams
from lynxsim.routing.trace import RoutingTrace
from lynxsim.routing.trace_format import load_trace, save_trace

__all__ = [
    "RoutingSource",
    "RoutingTrace",
    "SyntheticRouting",
    "SyntheticRoutingParams",
    "TraceReplayRouting",
    "import_flame",
    "load_flame_csv_dir",
    "load_trace",
    "save_trace",
]
