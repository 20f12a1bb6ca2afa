"""The simpy oracle's cluster: several ``Replica`` processes behind request routers on one simpy clock, with
the deployment rules of ``lynxsim.engine.deployment`` (its docstring states them)."""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
import simpy

from lynxsim.datatypes import RequestSpec
from lynxsim.engine.compiled.driver import iteration_table
from lynxsim.engine.deployment import KVTransfer, Role
from lynxsim.engine.routers import RouterFactory
from lynxsim.metrics import request_table
from lynxsim.plugins import ROUTERS
from simpy_oracle.replica import Replica
from simpy_oracle.request import Request

Mode = Literal["colocated", "disaggregated"]


class Cluster:
    """Serving instances that share one simpy environment, with arrivals, routing and KV-cache transfers.

    ``instances`` are all ``colocated``, or ``prefill`` and ``decode`` ones (at least one of each; ``transfer``
    required). Each instance's ``index`` is its position in ``instances``; it is what the records call
    ``instance``.
    """

    def __init__(
        self,
        instances: Sequence[Replica],
        *,
        router: str | RouterFactory = "round_robin",
        transfer: KVTransfer | None = None,
    ) -> None:
        if not instances:
            raise ValueError("a cluster needs at least one instance")
        self.instances = list(instances)
        self.env = self.instances[0].env
        for position, instance in enumerate(self.instances):
            if instance.env is not self.env:
                raise ValueError("the instances of a cluster must share one simpy environment")
            if instance.index != position:
                raise ValueError(f"instance at position {position} has index {instance.index}")
            if instance.cluster is not None:
                raise ValueError(f"instance {position} already belongs to a cluster")
        roles = {instance.role for instance in self.instances}
        self.mode: Mode
        if roles == {"colocated"}:
            self.mode = "colocated"
            self.entry = self.instances
            self.decode: list[Replica] = []
        elif roles == {"prefill", "decode"}:
            if transfer is None:
                raise ValueError("a disaggregated cluster needs a KVTransfer")
            self.mode = "disaggregated"
            self.entry = [i for i in self.instances if i.role == "prefill"]
            self.decode = [i for i in self.instances if i.role == "decode"]
        else:
            raise ValueError(
                f"instance roles {sorted(roles)}: give co-located instances only, or prefill and decode instances"
            )
        self.transfer = transfer
        new_router = ROUTERS.bind(router, {}) if isinstance(router, str) else router
        self._entry_router = new_router()
        self._decode_router = new_router()
        for instance in self.instances:
            instance.cluster = self
        self.arrived: list[Request] = []
        self.statuses: dict[int, str] = {}
        self._open = 0  # requests routed and not finished
        self._arrivals_done = False
        self._done = self.env.event()
        self._held_blocks: dict[int, int] = {}  # request id -> blocks its prefill instance holds during the transfer
        self.next_arrival_s = math.inf  # the arrival the arrival process waits for (inf: none left)
        self.cutoff_s = math.inf

    @classmethod
    def build(
        cls,
        roles: Sequence[Role],
        make_instance: Callable[[simpy.Environment, int, Role], Replica],
        *,
        router: str | RouterFactory = "round_robin",
        transfer: KVTransfer | None = None,
    ) -> Cluster:
        """A cluster of ``len(roles)`` instances on a fresh environment, ``make_instance(env, index, role)`` each."""
        env = simpy.Environment()
        instances = [make_instance(env, index, role) for index, role in enumerate(roles)]
        return cls(instances, router=router, transfer=transfer)

    # ----- running -----

    def run(self, specs: Sequence[RequestSpec], cutoff_s: float | None) -> float:
        """Simulate until every request is done (or ``cutoff_s``); returns the simulated end time in seconds."""
        self.cutoff_s = math.inf if cutoff_s is None else cutoff_s
        self.env.process(self._arrivals(specs))
        for instance in self.instances:
            self.env.process(instance.serve())
        self.env.run(until=self._done if cutoff_s is None else cutoff_s)
        self._mark_cut_off()
        return float(self.env.now)

    def _arrivals(self, specs: Sequence[RequestSpec]) -> Generator[simpy.Event, Any, None]:
        for spec in specs:
            if spec.arrival_s >= self.cutoff_s:
                # A timeout's clock adds up differences (0.8 + (3.6 - 0.8) is just below 3.6): a request arriving at
                # the cut-off would otherwise slip in before it.
                break
            self.next_arrival_s = spec.arrival_s
            if spec.arrival_s > self.env.now:
                yield self.env.timeout(spec.arrival_s - self.env.now)
            request = Request.arriving(spec)
            self.arrived.append(request)
            self._route(request)
        self.next_arrival_s = math.inf
        self._arrivals_done = True
        self._check_done()

    def _route(self, request: Request) -> None:
        disaggregated = self.mode == "disaggregated"
        eligible, reason = _eligible(self.entry, request, request.spec.prompt_tokens if disaggregated else None)
        if reason is None and disaggregated:
            reason = _eligible(self.decode, request, None)[1]
        if reason is not None:
            self.statuses[request.request_id] = f"rejected_{reason}"
            return
        instance = self.entry[self._entry_router.pick(self.entry, eligible)]
        request.instance = instance.index
        if not disaggregated:
            request.decode_instance = instance.index
        instance.outstanding += 1
        self._open += 1
        instance.scheduler.add(request)
        instance.wake()

    # ----- called by the instances -----

    def finished(self, request: Request, instance: Replica) -> None:
        self.statuses[request.request_id] = "finished"
        instance.outstanding -= 1
        self._open -= 1
        self._check_done()

    def prefilled(self, request: Request, source: Replica) -> None:
        """``request``'s prompt is computed on prefill instance ``source`` (and its first token sampled): keep its
        blocks there, and queue it at a decode instance."""
        self._held_blocks[request.request_id] = source.scheduler.pool.take_over(request)
        eligible, _ = _eligible(self.decode, request, None)
        target = self.decode[self._decode_router.pick(self.decode, eligible)]
        request.decode_instance = target.index
        target.outstanding += 1
        target.incoming.append(request)
        target.wake()

    def start_transfer(self, request: Request, target: Replica) -> None:
        """``target`` has allocated ``request``'s KV blocks: move its computed tokens' KV cache there."""
        assert self.transfer is not None
        request.transfer_start_s = self.env.now
        done = self.env.timeout(self.transfer.time_s(request.num_computed_tokens))
        done.callbacks.append(lambda _event: self._transferred(request, target))

    def _transferred(self, request: Request, target: Replica) -> None:
        request.transfer_end_s = self.env.now
        source = self.instances[request.instance]
        source.scheduler.pool.free(self._held_blocks.pop(request.request_id))
        source.outstanding -= 1
        source.wake()
        target.received(request)

    # ----- the end -----

    def _check_done(self) -> None:
        if self._arrivals_done and self._open == 0 and not self._done.triggered:
            self._done.succeed()

    def _mark_cut_off(self) -> None:
        """Give every request still in the system its cut-off status, with its counters written back (a running
        request's live in its scheduler's ``RunningSet``)."""
        for instance in self.instances:
            instance.scheduler.running.write_back()
            for request in instance.scheduler.running:
                self.statuses[request.request_id] = "cutoff_running"
            for request in instance.scheduler.waiting:
                self.statuses[request.request_id] = "cutoff_waiting"
            for request in instance.incoming:
                self.statuses[request.request_id] = "cutoff_awaiting_transfer"
            for request in instance.receiving.values():
                self.statuses[request.request_id] = "cutoff_transferring"
        missing = [r.request_id for r in self.arrived if r.request_id not in self.statuses]
        if missing:
            raise RuntimeError(f"requests {missing[:10]} arrived but are in no state (a simulator bug)")

    # ----- records -----

    def iterations(self) -> pd.DataFrame:
        """Every instance's iterations, in order of start time (then instance)."""
        return iteration_table([instance.log.frame() for instance in self.instances])


def _eligible(pool: Sequence[Replica], request: Request, max_tokens: int | None) -> tuple[list[bool], str | None]:
    """Which instances of ``pool`` could ever hold ``request`` (``max_tokens`` of it), and, when none could, the
    first one's reason."""
    reasons = [instance.scheduler.rejection_reason(request, max_tokens) for instance in pool]
    eligible = [reason is None for reason in reasons]
    return eligible, (None if any(eligible) else reasons[0])


def run_alone(replica: Replica, specs: Sequence[RequestSpec], cutoff_s: float | None) -> float:
    """Simulate one instance alone until every request is done (or ``cutoff_s``); returns the simulated end
    time in seconds, and leaves the requests' fate on the instance (``arrived``, ``statuses``) as a cluster of
    several keeps it on itself."""
    cluster = Cluster([replica])
    end_s = cluster.run(specs, cutoff_s)
    replica.arrived, replica.statuses = cluster.arrived, cluster.statuses
    return end_s


def requests_frame(requests: list[Request], statuses: dict[int, str]) -> pd.DataFrame:
    """One row per arrived request (``request_table``), from the engine's ``Request`` objects."""
    nan = float("nan")

    def times(values: list[float | None]) -> np.ndarray:
        return np.array([nan if v is None else v for v in values], dtype=float)

    return request_table(
        request_id=np.array([r.request_id for r in requests], dtype=np.int64),
        arrival_s=np.array([r.spec.arrival_s for r in requests], dtype=float),
        prompt_tokens=np.array([r.spec.prompt_tokens for r in requests], dtype=np.int64),
        output_tokens=np.array([r.spec.output_tokens for r in requests], dtype=np.int64),
        generated_tokens=np.array([r.generated_tokens for r in requests], dtype=np.int64),
        first_scheduled_s=times([r.first_scheduled_s for r in requests]),
        first_token_s=times([r.first_token_s for r in requests]),
        finish_s=times([r.finish_s for r in requests]),
        preemptions=np.array([r.num_preemptions for r in requests], dtype=np.int64),
        cached_tokens=np.zeros(len(requests), dtype=np.int64),  # the oracle has no prefix caching
        instance=np.array([r.instance for r in requests], dtype=np.int64),
        decode_instance=np.array([r.decode_instance for r in requests], dtype=np.int64),
        transfer_start_s=times([r.transfer_start_s for r in requests]),
        transfer_end_s=times([r.transfer_end_s for r in requests]),
        status=[statuses[r.request_id] for r in requests],
    )
