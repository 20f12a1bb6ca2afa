"""``weighted_round_robin``: instance ``i`` of a pool takes ``weights[i]`` requests in a row, in turn.

A router (``lynxsim.engine.RequestRouter``) picks one instance of a pool per request; lynxsim makes one router
per pool and simulation, so it may keep state. With ``weights: [3, 1]`` on two replicas requests go to 0, 0, 0,
1, 0, 0, 0, 1, ...: the assignment pattern a test reads from the requests' ``instance`` column.
"""

from __future__ import annotations

from collections.abc import Sequence

from lynxsim.engine import InstanceLoad, RequestRouter


class WeightedRoundRobin(RequestRouter):
    """Round robin over a cycle where instance ``i`` appears ``weights[i]`` times; an instance that cannot hold
    the request (not ``eligible``) passes its turn to the next in the cycle."""

    def __init__(self, weights: list[int]) -> None:
        if not weights or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in weights):
            raise ValueError(f"weights must be whole numbers >= 1, one per instance, got {weights!r}")
        self._weights = list(weights)
        self._cycle = [position for position, weight in enumerate(weights) for _ in range(weight)]
        self._turn = 0

    def pick(self, pool: Sequence[InstanceLoad], eligible: Sequence[bool]) -> int:
        if len(pool) != len(self._weights):
            raise ValueError(f"{len(self._weights)} weights for a pool of {len(pool)} instances")
        for step in range(len(self._cycle)):
            turn = (self._turn + step) % len(self._cycle)
            if eligible[self._cycle[turn]]:
                self._turn = turn + 1
                return self._cycle[turn]
        raise ValueError("no eligible instance")
