"""Request routers: which instance of a pool receives a request (``deployment.router``).

Each pool of a deployment (its co-located or prefill instances; its decode instances) has its own router, made
fresh for each simulation. The engine's orchestrator (``lynxsim.engine.compiled.orchestrator``) asks it, in
simulated-time order, with every instance of the pool brought up to that moment, so that what a router reads of an
instance (``InstanceLoad``) is its state then. A router only considers instances that could ever hold the request
(``eligible``; all of them when the instances are alike).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

from lynxsim.engine.deployment import InstanceLoad


class RequestRouter(ABC):
    """Picks the instance of a pool that receives a request: the interface of every router an experiment can
    name (``deployment.router``). A router may keep state between requests (it serves one pool, in one
    simulation); what it reads of an instance (``outstanding``, ``index``, ``role``) it must not change."""

    reads_load = True
    """Whether ``pick`` reads the instances' state (``outstanding``). A router that does not (round robin) has
    every arrival routed before the simulation starts, which lets co-located instances run independently."""

    @abstractmethod
    def pick(self, pool: Sequence[InstanceLoad], eligible: Sequence[bool]) -> int:
        """Position in ``pool`` of the chosen instance, among those with ``eligible[i]`` (at least one is)."""


class RoundRobinRouter(RequestRouter):
    """Each request to the next eligible instance after the previous choice, cyclically (0, 1, ..., n-1, 0, ...)."""

    reads_load = False

    def __init__(self) -> None:
        self._next = 0

    def pick(self, pool: Sequence[InstanceLoad], eligible: Sequence[bool]) -> int:
        size = len(pool)
        for step in range(size):
            position = (self._next + step) % size
            if eligible[position]:
                self._next = position + 1
                return position
        raise ValueError("no eligible instance")


class LeastOutstandingRouter(RequestRouter):
    """The eligible instance with the fewest outstanding requests (``InstanceLoad.outstanding``); ties to the lowest
    index."""

    def pick(self, pool: Sequence[InstanceLoad], eligible: Sequence[bool]) -> int:
        best = -1
        for position, instance in enumerate(pool):
            if eligible[position] and (best < 0 or instance.outstanding < pool[best].outstanding):
                best = position
        if best < 0:
            raise ValueError("no eligible instance")
        return best


RouterFactory = Callable[[], RequestRouter]
"""Makes one pool's router (a registered router with its parameters bound: ``ROUTERS.bind``)."""
