"""``hot_experts``: the model's own routing with a few experts every token prefers.

A routing source (``lynxsim.routing.base.RoutingSource``) gives the router logits of any token, named by request
id and position, the same whatever else is in the batch; its factory is called with a ``RoutingContext`` as
``context=``. This one takes lynxsim's ``model`` routing and raises the logits of experts ``0 .. hot - 1`` of
every layer by ``boost``: with ``hot`` at least the model's top-k, every token's top-k lies among them, so no
top-k iteration activates more than ``hot`` experts in a layer (a run's ``distinct_experts``).
"""

from __future__ import annotations

import numpy as np

from lynxsim.plugins import ROUTING_SOURCES
from lynxsim.routing.base import RoutingContext


class HotExperts:
    """The ``model`` routing source with the logits of the first ``hot`` experts raised by ``boost``."""

    def __init__(self, *, context: RoutingContext, hot: int, boost: float = 100.0) -> None:
        self.inner = ROUTING_SOURCES.bind("model", {})(context=context)
        self.num_moe_layers = self.inner.num_moe_layers
        self.num_experts = self.inner.num_experts
        if isinstance(hot, bool) or not isinstance(hot, int) or not 1 <= hot <= self.num_experts:
            raise ValueError(f"hot must be a whole number in [1, {self.num_experts}], got {hot!r}")
        self.hot = hot
        self.boost = np.float32(boost)

    def logits(self, request_ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        # a copy: the inner source may hand out an array it keeps
        logits = np.array(self.inner.logits(request_ids, positions), dtype=np.float32)
        logits[..., : self.hot] += self.boost
        return logits
