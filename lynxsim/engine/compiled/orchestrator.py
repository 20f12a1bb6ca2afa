"""Several serving instances on the compiled engine: request routers and KV-cache transfers between them.

Each instance runs in the compiled loop (``CompiledInstance``); this module holds only what lies between them,
with the rules of ``lynxsim.engine.deployment`` (its docstring states them): arrivals routed to the co-located or
prefill instances, a prefill instance's finished prompt handed to a decode instance, which allocates its KV
blocks and pulls its KV cache, the prefill instance freeing its blocks when the transfer ends.

Time is kept conservatively, as in a parallel discrete-event simulation: each instance runs ahead on its own up
to a horizon, the earliest time an input it does not know yet could reach it, and messages (arrivals,
hand-offs) are routed in time order once every instance has reached their time, so that a router reads each
instance's load at that moment. The horizons:

* a co-located or prefill instance: the next message to route (an arrival may come to it), and, for a prefill
  instance, the earliest end of a transfer of one of its handed-off requests not yet started (a decode instance
  starts it no earlier than its own clock: ``max(hand-off, decode clock) + transfer time``), when its blocks
  come back;
* a decode instance: the next hand-off to route, and just past the earliest clock of a prefill instance with
  work (a prefill instance's next hand-off ends an iteration it has not started yet), or the end of a prefill
  instance's iteration under way (``CompiledInstance.paused``: its hand-offs come at that end, and a decode
  instance whose clock ran past it would start their transfers late); its own transfers' ends it keeps itself.

The instance furthest behind can always move (its inputs come from instances at or after its clock, and a
transfer takes time), so the loop advances it, and routes the next message once no instance can move. A
router whose picks do not depend on the instances' load (``RequestRouter.reads_load`` False: round robin)
has every arrival routed before the run starts, so co-located instances then run from start to end at once.

Closed-loop clients (``ClosedLoop``) send a request whenever one ends: the instances then stop at every finish
(``kernel.K_STOP_ON_FINISH``), so that the request it releases, which arrives no earlier, is routed before any
instance forms an iteration past its time; arrivals are the clients' sends in time order (``_Sends``).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from lynxsim.datatypes import RequestSpec, RequestTable
from lynxsim.engine.compiled import kernel as k
from lynxsim.engine.compiled.driver import (
    PROGRESS_EVERY_REQUESTS,
    CompiledRun,
    arrival_rejections,
    request_records,
    run_blocks,
    simulate,
)
from lynxsim.engine.compiled.instance import CompiledInstance
from lynxsim.engine.compiled.prefix_cache import RunBlocks
from lynxsim.engine.deployment import KVTransfer
from lynxsim.engine.routers import RequestRouter
from lynxsim.engine.routing_step import RoutingStep
from lynxsim.engine.scheduler import Scheduler
from lynxsim.instance_cost import InstanceCostModel

ST_AWAITING_TRANSFER, ST_TRANSFERRING = 20, 21
"""Cut-off statuses only a cluster gives (``kernel``'s codes stay below them)."""
STATUS_NAMES = {ST_AWAITING_TRANSFER: "cutoff_awaiting_transfer", ST_TRANSFERRING: "cutoff_transferring"}


class _Held:
    """A request handed off by a prefill instance whose transfer has not started: where it went and when."""

    __slots__ = ("handed_s", "target", "transfer_s")

    def __init__(self, handed_s: float, transfer_s: float) -> None:
        self.handed_s = handed_s
        self.target: CompiledInstance | None = None  # its decode instance, once routed
        self.transfer_s = transfer_s


class _Load:
    """An instance's outstanding requests at a routing time: those whose end there (finished, or KV cache
    moved out) is after that time stay outstanding."""

    def __init__(self, instance: CompiledInstance) -> None:
        self.instance = instance
        self.ends: list[float] = []  # heap of known end times not yet counted

    def settle(self, now_s: float) -> None:
        ends = self.ends
        while ends and ends[0] <= now_s:
            heapq.heappop(ends)
            self.instance.outstanding -= 1


@dataclass(frozen=True)
class ClosedLoop:
    """Closed-loop clients (``workload.arrivals.ClosedLoopArrivals``): ``clients`` requests in flight at most;
    no request is sent at or after ``until_s``. The think times are the requests' own (``RequestTable.think_s``)."""

    clients: int
    until_s: float = math.inf


class _Sends:
    """When closed-loop clients send: every client's first request at time 0, then, whenever a request ends (it
    finished, or was rejected on arrival), one more after the next think time. The ``j``-th release (in the order
    the run meets them: deterministic) waits ``think_s[j]``; requests go out in the order they are sent."""

    def __init__(self, loop: ClosedLoop, think_s: np.ndarray, count: int) -> None:
        self.think_s = think_s
        self.count = count
        self.until_s = loop.until_s
        first = min(loop.clients, count)
        self.heap: list[tuple[float, int]] = [(0.0, order) for order in range(first)]
        self.scheduled = first  # sends in the heap or sent
        self.releases = 0

    def next_s(self) -> float:
        if self.heap and self.heap[0][0] < self.until_s:
            return self.heap[0][0]
        return math.inf

    def pop(self) -> float:
        return heapq.heappop(self.heap)[0]

    def release(self, end_s: float) -> None:
        """A request ended at ``end_s``: its client sends the next one, if any is left, after its think time."""
        if self.scheduled < self.count:
            heapq.heappush(self.heap, (end_s + float(self.think_s[self.releases]), self.scheduled))
            self.releases += 1
            self.scheduled += 1


class _Cluster:
    """The state of one run of several instances (``simulate_deployment``): its instances, the messages still to
    route, the handed-off requests whose transfer has not started."""

    def __init__(
        self, make_scheduler: Callable[[], Scheduler], make_instance: Callable[[Scheduler, int, str], CompiledInstance],
        roles: Sequence[str], specs: Sequence[RequestSpec], cutoff_s: float | None,
        make_router: Callable[[], RequestRouter], transfer: KVTransfer | None,
        on_arrivals: Callable[[int], None] | None, closed_loop: ClosedLoop | None = None,
    ) -> None:
        self.specs = RequestTable.of(specs)
        self.sends: _Sends | None = None
        if closed_loop is not None:
            table = self.specs
            if table.think_s is None:
                raise ValueError("closed-loop clients need the requests' think times (RequestTable.think_s)")
            # the arrival times are this run's to fill in: a copy, not the requests every policy is given
            self.specs = RequestTable(table.request_id, table.arrival_s.copy(), table.prompt_tokens,
                                      table.output_tokens, table.think_s, table.prefix)
            self.sends = _Sends(closed_loop, table.think_s, len(table))
        self.cutoff_s = math.inf if cutoff_s is None else float(cutoff_s)
        self.disaggregated = "prefill" in roles
        if self.disaggregated and transfer is None:
            raise ValueError("a disaggregated cluster needs a KVTransfer")
        self.transfer = transfer
        self.instances = [make_instance(make_scheduler(), index, role) for index, role in enumerate(roles)]
        self.entry = [i for i in self.instances if i.role != "decode"]
        self.decode = [i for i in self.instances if i.role == "decode"]
        self.loads = [_Load(i) for i in self.instances]
        self.entry_router, self.decode_router = make_router(), make_router()
        self.on_arrivals = on_arrivals
        n = len(specs)
        self.rejections = arrival_rejections(self.specs, self.entry[0].scheduler,
                                             self.decode[0].scheduler if self.disaggregated else None)
        self.homes = np.full(n, -1, dtype=np.int64)  # the instance holding each request's record (-1: none)
        self.home_rows = np.zeros(n, dtype=np.int64)
        self.entry_instance = np.full(n, -1, dtype=np.int64)  # the instance the router gave it
        self.entry_rows = np.zeros(n, dtype=np.int64)
        self.held: dict[tuple[int, int], _Held] = {}  # (prefill instance, row) -> handed off, transfer not started
        self.handoffs: list[tuple[float, int, int, int]] = []  # heap: (time, order, prefill instance, row)
        self.handoff_order = 0
        self.arrived = 0  # arrivals routed (or rejected)
        self.routed_ahead = not self.entry_router.reads_load and self.sends is None  # sends wait for finishes
        self.last_arrival_s = 0.0
        self.next_report = 0

    # ----- messages -----

    def _next_arrival_s(self) -> float:
        if self.sends is not None:
            next_s = self.sends.next_s()
            return next_s if next_s < self.cutoff_s else math.inf
        if self.arrived < len(self.specs) and self.specs.arrival_s[self.arrived] < self.cutoff_s:
            return float(self.specs.arrival_s[self.arrived])
        return math.inf

    def _route_arrival(self) -> None:
        position = self.arrived
        if self.sends is not None:  # the next request goes out now
            self.specs.arrival_s[position] = self.sends.pop()
            if self.rejections[position] != k.ST_NONE:
                self.sends.release(float(self.specs.arrival_s[position]))
        spec = self.specs[position]
        self.arrived += 1
        self.last_arrival_s = spec.arrival_s
        if self.rejections[position] == k.ST_NONE:
            for instance in self.entry:
                self.loads[instance.index].settle(spec.arrival_s)
            instance = self.entry[self.entry_router.pick(self.entry, [True] * len(self.entry))]
            row = instance.push(position, spec.request_id, spec.arrival_s, spec.arrival_s, spec.prompt_tokens,
                                spec.output_tokens)
            self.homes[position] = self.entry_instance[position] = instance.index
            self.home_rows[position] = self.entry_rows[position] = row
            instance.outstanding += 1
        if not self.routed_ahead:
            self._report(self.arrived)

    def _report(self, arrived: int) -> None:
        """Progress: ``arrived`` requests have reached the instances (every ``PROGRESS_EVERY_REQUESTS``)."""
        if self.on_arrivals is not None and (arrived >= self.next_report or arrived == len(self.specs)):
            self.on_arrivals(arrived)
            self.next_report = arrived + PROGRESS_EVERY_REQUESTS

    def _route_handoff(self) -> None:
        time_s, _order, source_index, row = heapq.heappop(self.handoffs)
        source = self.instances[source_index]
        for instance in self.decode:
            self.loads[instance.index].settle(time_s)
        target = self.decode[self.decode_router.pick(self.decode, [True] * len(self.decode))]
        self.held[(source_index, row)].target = target
        position = int(source.positions[row])
        self.homes[position] = target.index
        self.home_rows[position] = target.push_handed_off(source, row, time_s)
        target.outstanding += 1

    def _take_events(self, instance: CompiledInstance) -> Callable[[np.ndarray, np.ndarray], None]:
        """What ``instance``'s outbox says, applied: finishes (its load's end times), hand-offs (messages to
        route), transfers started (the prefill side's blocks and load come back at their end)."""

        def take(kinds_rows: np.ndarray, times: np.ndarray) -> None:
            for (kind, row), time_s in zip(kinds_rows.tolist(), times.tolist(), strict=True):
                if kind == k.EV_FINISH:
                    heapq.heappush(self.loads[instance.index].ends, time_s)
                    if self.sends is not None:
                        self.sends.release(time_s)
                elif kind == k.EV_HANDOFF:
                    assert self.transfer is not None
                    transfer_s = self.transfer.time_s(int(instance.req_i[row, k.R_COMPUTED]))
                    self.held[(instance.index, row)] = _Held(time_s, transfer_s)
                    heapq.heappush(self.handoffs, (time_s, self.handoff_order, instance.index, row))
                    self.handoff_order += 1
                else:  # EV_TRANSFER: time_s is the transfer's end
                    position = int(instance.positions[row])
                    source = self.instances[int(self.entry_instance[position])]
                    source_row = int(self.entry_rows[position])
                    del self.held[(source.index, source_row)]
                    source.free_at(source_row, time_s)
                    heapq.heappush(self.loads[source.index].ends, time_s)

        return take

    # ----- time -----

    def serve(self) -> None:
        """Advance the instance furthest behind that can move, else route the next message, until neither is
        left."""
        routed_ahead = self.routed_ahead
        self._report(0)
        if routed_ahead:  # every arrival now: the picks do not depend on the instances' state
            while self._next_arrival_s() < math.inf:
                self._route_arrival()
            for instance in self.instances:  # progress: the arrivals the instances have taken in
                instance.config[k.K_PROGRESS_EVERY] = PROGRESS_EVERY_REQUESTS
        takers = [self._take_events(i) for i in self.instances]

        def taken_in(_arrived_here: int) -> None:
            self._report(sum(int(i.state[k.S_ARRIVED]) for i in self.entry))

        while True:
            t_arrival = self._next_arrival_s()
            t_handoff = self.handoffs[0][0] if self.handoffs else math.inf
            mover, horizon = self._mover(math.inf if routed_ahead else t_arrival, t_handoff)
            if mover is not None:
                mover.done = mover.advance(horizon, takers[mover.index], taken_in) == k.DONE
                continue
            t_message = min(t_arrival, t_handoff)
            if t_message == math.inf:
                if self.on_arrivals is not None:
                    self.on_arrivals(len(self.specs))
                return
            behind = [i.index for i in self.instances if i.frontier_s < t_message and not (i.cut or i.done)]
            if behind:
                raise RuntimeError(f"instances {behind} are behind the message at {t_message} s and cannot move "
                                   "(a simulator bug)")
            if t_arrival <= t_handoff:
                self._route_arrival()
            else:
                self._route_handoff()

    def _mover(self, t_arrival: float, t_handoff: float) -> tuple[CompiledInstance | None, float]:
        """The instance furthest behind among those that can move, and its horizon (module docstring)."""
        handoff_bound = math.inf  # no prefill instance hands a request off at or before this
        for instance in self.entry:
            if instance.role == "prefill" and not instance.cut:
                if instance.paused:  # its iteration under way hands its requests off as it ends, at its frontier
                    handoff_bound = min(handoff_bound, math.nextafter(instance.frontier_s, -math.inf))
                else:
                    handoff_bound = min(handoff_bound, instance.earliest_start_s, max(instance.now_s, t_arrival))
        free_bound: dict[int, float] = {}
        if self.held:
            earliest_decode = min(i.now_s for i in self.decode)
            for (source, _row), request in self.held.items():
                decides = request.target.now_s if request.target is not None else earliest_decode
                end = max(request.handed_s, decides) + request.transfer_s
                free_bound[source] = min(free_bound.get(source, math.inf), end)
        mover: CompiledInstance | None = None
        mover_horizon = math.inf
        for instance in self.instances:
            if instance.role == "decode":
                horizon = min(t_handoff, math.nextafter(handoff_bound, math.inf))
            else:
                horizon = min(t_arrival, free_bound.get(instance.index, math.inf))
            if instance.can_move(horizon) and (mover is None or instance.now_s < mover.now_s):
                mover, mover_horizon = instance, horizon
        return mover, mover_horizon

    # ----- records -----

    def records(self) -> CompiledRun:
        """The arrived requests' records, in arrival order, each from the instance where it ended up; every
        instance's log; the simulated end."""
        instances = self.instances
        for instance in instances:
            instance.finish()
        n = self.arrived
        statuses = self.rejections[:n].copy()
        homes = self.homes[:n]
        for instance in instances:
            rows = np.arange(instance.pushed)
            positions = instance.positions[rows]
            here = homes[positions] == instance.index
            statuses[positions[here]] = instance.req_i[rows[here], k.R_STATUS]
            if instance.role == "decode":
                statuses[instance.positions[instance.awaiting_transfer()]] = ST_AWAITING_TRANSFER
                transferring = instance.transferring()
                statuses[instance.positions[transferring]] = ST_TRANSFERRING
                instance.req_f[transferring, k.RF_TRANSFER_END] = np.nan  # it would have ended after the cut-off
        for source_index, row in self.held:  # handed off at the cut-off and not yet on a decode instance
            position = int(instances[source_index].positions[row])
            if homes[position] == source_index:
                statuses[position] = ST_AWAITING_TRANSFER
        entry_instance = self.entry_instance[:n]
        decode_instance = (np.where(self.homes[:n] != entry_instance, self.homes[:n], -1) if self.disaggregated
                           else entry_instance)
        specs = self.specs
        requests = request_records(instances, homes, self.home_rows[:n], specs[:n], entry_instance,
                                   decode_instance, statuses, STATUS_NAMES)
        if self.cutoff_s < math.inf:
            end_s = self.cutoff_s
        else:
            finishes = requests["finish_s"].to_numpy(dtype=float)
            end_s = max(self.last_arrival_s, float(np.nanmax(finishes)) if np.isfinite(finishes).any() else 0.0)
        return CompiledRun(requests, [instance.log() for instance in instances], end_s)


def simulate_deployment(
    roles: Sequence[str],
    make_scheduler: Callable[[], Scheduler],
    cost_model: InstanceCostModel,
    step: RoutingStep,
    num_moe_layers: int,
    specs: Sequence[RequestSpec],
    cutoff_s: float | None,
    make_router: Callable[[], RequestRouter],
    transfer: KVTransfer | None,
    on_arrivals: Callable[[int], None] | None = None,
    closed_loop: ClosedLoop | None = None,
) -> CompiledRun:
    """Serve ``specs`` on instances of ``roles`` (all ``colocated``, or ``prefill`` and ``decode``), each with a
    scheduler from ``make_scheduler``, behind ``make_router``'s routers (one per pool), until every request is done
    or ``cutoff_s``; ``transfer`` prices KV-cache transfers (disaggregated only); ``closed_loop``: the requests
    are sent by closed-loop clients (their arrival times filled in as they go out). One co-located instance with
    open-loop arrivals runs alone (``driver.simulate``)."""
    if list(roles) == ["colocated"] and closed_loop is None:
        return simulate(make_scheduler(), cost_model, step, num_moe_layers, specs, cutoff_s, on_arrivals)

    table = RequestTable.of(specs)
    blocks_by_size: dict[int, RunBlocks | None] = {}  # the run's block identities, once per KV block size

    def make_instance(scheduler: Scheduler, index: int, role: str) -> CompiledInstance:
        size = scheduler.pool.block_size_tokens
        if size not in blocks_by_size:
            blocks_by_size[size] = run_blocks(table, scheduler)
        return CompiledInstance(scheduler, cost_model, step, num_moe_layers, len(specs), index=index, role=role,
                                cutoff_s=cutoff_s, transfer=transfer, record_events=True,
                                stop_on_finish=closed_loop is not None, blocks=blocks_by_size[size])

    run = _Cluster(make_scheduler, make_instance, roles, table, cutoff_s, make_router, transfer, on_arrivals,
                   closed_loop)
    run.serve()
    return run.records()
