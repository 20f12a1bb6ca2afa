"""Where router logits come from: the ``RoutingSource`` contract and its implementations."""

from lynxsim.routing.base import RoutingSource
from lynxsim.routing.synthetic import SyntheticRouting, SyntheticRoutingParams

__all__ = ["RoutingSource", "SyntheticRouting", "SyntheticRoutingParams"]
