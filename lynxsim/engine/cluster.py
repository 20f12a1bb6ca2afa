"""Several serving instances behind a request router, on one simpy clock.

A cluster is either

* **co-located**: ``replicas`` instances, each doing prefill and decode (continuous batching with chunked prefill);
  the router gives each arriving request to one of them; or
* **disaggregated** (DistServe, Splitwise, vLLM's prefill/decode disaggregation): ``prefill`` instances compute
  prompts, ``decode`` instances generate the other tokens. The router gives each arriving request to a prefill
  instance; the iteration that completes its prompt samples its first token (TTFT is measured there); the router
  then picks a decode instance among the decode instances, which allocates the request's KV blocks (the prompt and
  the first token's slot; while its pool is short the request waits in its queue, and the prefill instance keeps
  its blocks) and pulls the prompt's KV cache. The transfer takes ``KVTransfer.time_s``: the prompt's KV bytes
  (``ModelSpec.kv_bytes_per_token`` * tokens) over the transfer bandwidth, plus a fixed latency. When it ends the
  prefill instance frees the request's blocks and the decode instance decodes it from its next iteration on.

  This is the pull order of vLLM's NixlConnector and of Mooncake: the decode side allocates, then reads, so a full
  decode pool pushes back on the prefill instances (whose blocks stay held) rather than losing KV data. Transfers
  do not contend: each runs at the full bandwidth whatever else is in flight (the per-GPU link is shared in reality,
  so many concurrent long transfers come out optimistic). A request preempted on a decode instance is recomputed
  there (its prompt and generated tokens become a prefill on that instance, priced like any prefill, with plain
  top-k under ``apply_to: decode_only``): upstream vLLM's decode instances recompute locally too, as far as we can
  tell (the remote-prefill parameters are consumed by the first KV load); vLLM-Ascend's RecomputeScheduler instead
  sends the request back to a prefill instance, which is not modelled.

Routers (``router``, a name of ``lynxsim.plugins.ROUTERS``): ``round_robin`` gives requests to the instances of
a pool in turn; ``least_outstanding`` to the instance with the fewest requests assigned and not yet done there
(co-located and decode instances: not finished; prefill instances: not finished and KV cache not yet transferred
out), ties to the lowest index; a plug-in's ``RequestRouter`` by its own rule. Each pool (the co-located or
prefill instances; the decode instances) has its own router, made fresh for each simulation. A router only
considers instances that could ever hold the request (all of them when the instances are alike); a request that
fits no instance of a pool is rejected on arrival with that instance's reason.

Every arrived request ends in ``statuses``: ``finished``, ``rejected_<reason>``, or, at the cut-off,
``cutoff_running``, ``cutoff_waiting`` (queued, or preempted, on an instance), ``cutoff_awaiting_transfer``
(prefilled, waiting for KV blocks on its decode instance) or ``cutoff_transferring`` (KV cache in transfer).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import pandas as pd
import simpy

from lynxsim.datatypes import RequestSpec
from lynxsim.engine.replica import Replica, Role
from lynxsim.engine.request import Request
from lynxsim.plugins import ROUTERS

Mode = Literal["colocated", "disaggregated"]


class RequestRouter(ABC):
    """Picks the instance of a pool that receives a request: the interface of every router an experiment can
    name (``deployment.router``). A router may keep state between requests (it serves one pool, in one
    simulation); what it reads of an instance (``outstanding``, ``index``, ``role``) it must not change."""

    reads_load = True
    """Whether ``pick`` reads the instances' state (``outstanding``). A router that does not (round robin) has
    every arrival routed before the simulation starts, which lets co-located instances run independently."""

    @abstractmethod
    def pick(self, pool: Sequence[Replica], eligible: Sequence[bool]) -> int:
        """Position in ``pool`` of the chosen instance, among those with ``eligible[i]`` (at least one is)."""


class RoundRobinRouter(RequestRouter):
    """Each request to the next eligible instance after the previous choice, cyclically (0, 1, ..., n-1, 0, ...)."""

    reads_load = False

    def __init__(self) -> None:
        self._next = 0

    def pick(self, pool: Sequence[Replica], eligible: Sequence[bool]) -> int:
        size = len(pool)
        for step in range(size):
            position = (self._next + step) % size
            if eligible[position]:
                self._next = position + 1
                return position
        raise ValueError("no eligible instance")


class LeastOutstandingRouter(RequestRouter):
    """The eligible instance with the fewest outstanding requests (``Replica.outstanding``); ties to the lowest
    index."""

    def pick(self, pool: Sequence[Replica], eligible: Sequence[bool]) -> int:
        best = -1
        for position, instance in enumerate(pool):
            if eligible[position] and (best < 0 or instance.outstanding < pool[best].outstanding):
                best = position
        if best < 0:
            raise ValueError("no eligible instance")
        return best


RouterFactory = Callable[[], RequestRouter]
"""Makes one pool's router (a registered router with its parameters bound: ``ROUTERS.bind``)."""


@dataclass(frozen=True)
class KVTransfer:
    """How long moving a request's KV cache from a prefill to a decode instance takes.

    ``bandwidth_bytes_per_s`` is one direction of the link; the default a run uses is the hardware profile's
    ``interconnect_bandwidth_bytes_per_s`` (NVLink within a node). Instances on different nodes move KV caches over
    the NICs (e.g. 400 Gb/s InfiniBand, 50e9 B/s per direction), roughly ten times slower: set the bandwidth then.
    """

    kv_bytes_per_token: float
    bandwidth_bytes_per_s: float
    latency_s: float = 0.0

    def __post_init__(self) -> None:
        if self.kv_bytes_per_token <= 0 or self.bandwidth_bytes_per_s <= 0 or self.latency_s < 0:
            raise ValueError(f"invalid KV transfer parameters {self}")

    def time_s(self, tokens: int) -> float:
        """Seconds to move the KV cache of ``tokens`` tokens: latency + bytes / bandwidth."""
        return self.latency_s + tokens * self.kv_bytes_per_token / self.bandwidth_bytes_per_s


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


def iteration_table(frames: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """The iteration records of a deployment's instances (their ``IterationLog.frame``s, in instance order) as
    one table, in order of start time (then instance)."""
    frames = [frame for frame in frames if len(frame)]
    if not frames:
        return pd.DataFrame()
    if len(frames) == 1:
        return frames[0]
    frame = pd.concat(frames, ignore_index=True)
    return frame.sort_values(["start_s", "instance"], kind="mergesort", ignore_index=True)


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
