"""One serving instance (a replica: one GPU set with its own scheduler, KV cache and cost model), as a simpy
process that runs iterations back to back. Arrivals, routing between instances and KV-cache transfers belong to
the ``Cluster`` (lynxsim/engine/cluster.py) that the instance is part of (``run_alone``: a one-instance cluster).

An instance has a role: ``colocated`` (prefill and decode on the same GPUs, the usual vLLM deployment),
``prefill`` (disaggregated: computes prompts only; the iteration that completes a prompt samples the first token,
then the request is handed to the cluster for a decode instance while this instance keeps its KV blocks until the
transfer is done) or ``decode`` (disaggregated: receives requests whose prompt is computed, allocates their KV
blocks, waits for the transfer, then decodes them; its batches are pure decode except after a preemption, which
recomputes the request's prompt and generated tokens on this instance).

Each iteration the scheduler forms a batch; the routing source gives the router logits of exactly the batch's
tokens for every MoE layer; the selection policy picks each token's experts (the configured policy on iterations
it applies to, plain top-k on the others); the per-layer expert activity and the batch shape go to the cost model,
whose latency is how long simulated time advances before the batch's tokens are sampled. In the statistical
routing mode the per-layer activity is drawn from a table precomputed from the same routing source and policy
(``lynxsim.routing.statistical``) instead. Stretches of pure-decode iterations that no scheduler decision can
change are computed as one decode run (``lynxsim.engine.decode_run``), iteration by iteration but in one step.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Generator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import simpy

from lynxsim.datatypes import BatchShape, ExpertActivity, LatencyBreakdown
from lynxsim.engine.decode_run import run_token_ids
from lynxsim.engine.deployment import ROLES, Role
from lynxsim.engine.routing_step import RoutingStep
from lynxsim.instance_cost import InstanceCostModel
from lynxsim.routing.statistical import ActivityDraws, UniformStream
from simpy_oracle.decode_run import DecodeRun, plan_decode_run
from simpy_oracle.log import GrowingLog
from simpy_oracle.request import Request
from simpy_oracle.scheduler import ScheduledBatch, Scheduler

if TYPE_CHECKING:  # the cluster drives its instances, so it imports this module
    from simpy_oracle.cluster import Cluster

_NO_TOKENS = np.zeros(0, dtype=np.int64)


class Replica:
    """One serving instance. ``run`` serves a list of arriving requests on this instance alone; after it every
    arrived request is in ``arrived`` with a status in ``statuses``: finished, rejected (can never fit) or cut off
    (running or waiting at the cut-off). In a ``Cluster`` the cluster holds those instead."""

    decode_runs = True
    """Compute stretches of pure-decode iterations as decode runs; False steps every iteration alone (the same
    numbers, slower: the tests compare the two)."""

    def __init__(
        self,
        scheduler: Scheduler,
        cost_model: InstanceCostModel,
        step: RoutingStep,
        num_moe_layers: int,
        *,
        env: simpy.Environment | None = None,
        index: int = 0,
        role: Role = "colocated",
    ) -> None:
        if role not in ROLES:
            raise ValueError(f"unknown instance role {role!r}; known: {', '.join(ROLES)}")
        self.scheduler = scheduler
        self.cost_model = cost_model
        self.step = step
        self.env = simpy.Environment() if env is None else env
        self.index = index
        self.role: Role = role
        self.log = GrowingLog(num_moe_layers, instance=index, role=role)
        self.arrived: list[Request] = []
        self.statuses: dict[int, str] = {}
        self.outstanding = 0  # requests routed here and not yet done here (the least-outstanding router's load)
        self.incoming: deque[Request] = deque()  # decode role: prefilled requests waiting for KV blocks here
        self.receiving: dict[int, Request] = {}  # decode role: KV cache in transfer to here, by request id
        self.cluster: Cluster | None = None  # set by the cluster this instance joins
        self._wakeup: simpy.Event | None = None
        self._last_latency_s = 0.0
        self._uniforms = (  # the statistical mode's draws
            UniformStream(np.random.default_rng([step.seed, index])) if step.statistical is not None else None
        )

    def wake(self) -> None:
        """Something changed (a request arrived, blocks were freed, a transfer ended): look for work again."""
        if self._wakeup is not None and not self._wakeup.triggered:
            self._wakeup.succeed()

    def serve(self) -> Generator[simpy.Event, Any, None]:
        """The instance's process: iterations back to back, waiting whenever there is nothing to compute. It never
        returns; the cluster ends the simulation once every request is accounted for."""
        cluster = self.cluster
        assert cluster is not None, "an instance serves as part of a Cluster"
        hands_off = self.role == "prefill"
        scheduler = self.scheduler
        while True:
            run = self._plan_decode_run(cluster)
            if run is not None:
                done = yield from self._decode_run(cluster, run)
                if done:
                    continue
            batch = scheduler.schedule(self.env.now)
            if self.incoming:
                self._receive(cluster)
            if not len(batch):
                self._wakeup = self.env.event()
                yield self._wakeup
                continue
            start_s = self.env.now
            applied, latency, distinct, proxies = self._execute(batch)
            self._last_latency_s = latency.total_s
            yield self.env.timeout(latency.total_s)
            completion = scheduler.complete(batch, self.env.now, hand_off=hands_off)
            for request in completion.finished:
                cluster.finished(request, self)
            for request in completion.handed_off:
                cluster.prefilled(request, self)
            self.log.append(
                start_s=start_s,
                latency=latency,
                prefill_tokens=batch.num_tokens - batch.num_decode_tokens,
                decode_tokens=batch.num_decode_tokens,
                sequences=len(batch),
                sampled_tokens=completion.sampled,
                policy_applied=applied,
                distinct_experts=distinct,
                proxies=proxies,
                kv_used_fraction=scheduler.pool.used_fraction,
            )

    def _receive(self, cluster: Cluster) -> None:
        """Decode role: allocate KV blocks for prefilled requests, in arrival order, while the pool and the
        sequence limit allow, and start their transfers. Requests preempted here wait first (they would be
        first in vLLM's single waiting queue too)."""
        scheduler = self.scheduler
        while (
            self.incoming
            and not scheduler.waiting
            and len(scheduler.running) + scheduler.num_receiving < scheduler.max_num_seqs
        ):
            request = self.incoming[0]
            if not scheduler.pool.try_grow(request, request.num_tokens):  # the prompt plus the first sampled token
                return
            self.incoming.popleft()
            scheduler.num_receiving += 1
            self.receiving[request.request_id] = request
            cluster.start_transfer(request, self)

    def received(self, request: Request) -> None:
        """Decode role: ``request``'s KV cache is here; it decodes from the next iteration on."""
        del self.receiving[request.request_id]
        self.scheduler.num_receiving -= 1
        self.scheduler.running.append(request)
        self.wake()

    def _plan_decode_run(self, cluster: Cluster) -> DecodeRun | None:
        """The decode run that may start now (see ``lynxsim.engine.decode_run``); None: none."""
        scheduler = self.scheduler
        running = scheduler.running
        if (
            not self.decode_runs
            or not scheduler.decode_runs_allowed
            or self.role != "colocated"
            or not running
            or scheduler.waiting
            or len(running) > scheduler.max_num_batched_tokens
            or not running.all_decoding()
        ):
            return None
        return plan_decode_run(
            running, scheduler.pool, last_latency_s=self._last_latency_s,
            until_arrival_s=cluster.next_arrival_s - self.env.now,
        )

    def _decode_run(self, cluster: Cluster, run: DecodeRun) -> Generator[simpy.Event, Any, bool]:
        """Up to ``run.length`` pure-decode iterations of the running requests in one step; False (and nothing
        done) when not even the first fits before the cut-off, so the caller steps one iteration instead."""
        scheduler = self.scheduler
        batch_size = len(scheduler.running)
        length, contexts, grown = run
        ids = scheduler.running.ids[:batch_size]
        activities, distinct, proxies = self._activities(
            lambda: run_token_ids(ids, contexts, length),
            length, True, batch_size,
        )
        start_s = self.env.now
        latencies, ends = self._price_decode_run(cluster, contexts, activities, start_s)
        used = len(latencies)
        if used == 0:
            return False
        if self._uniforms is not None:
            self._uniforms.advance(used)
        pool = scheduler.pool
        kv_used = (pool.num_blocks - pool.free_blocks + grown[:used]) / pool.num_blocks
        self._last_latency_s = latencies[used - 1].total_s
        yield self.env.timeout(float(ends[used]) - start_s)
        finished, released = scheduler.advance_decode_run(used, self.env.now)
        if finished:
            kv_used[-1] -= released / pool.num_blocks
            for request in finished:
                cluster.finished(request, self)
        self.log.append_decode_run(
            start_s=ends[:used], latencies=latencies, sequences=batch_size, distinct_experts=distinct[:used],
            proxies=proxies[:, :used], kv_used_fraction=kv_used,
        )
        return True

    def _price_decode_run(
        self, cluster: Cluster, contexts: np.ndarray, activities: Sequence[ExpertActivity], start_s: float
    ) -> tuple[list[LatencyBreakdown], np.ndarray]:
        """The latencies of the decode run's iterations that happen, and their start times followed by the last
        one's end (``ends[j]``: iteration ``j`` starts, ``ends[j + 1]``: it ends). Each iteration must start
        before the next arrival (the first always does) and end by the cut-off. The cost model prices one
        iteration at a time, as in the engine, and only the iterations that happen."""
        end_s, starts, latencies = start_s, [start_s], []
        for j, activity in enumerate(activities):
            if j and end_s >= cluster.next_arrival_s:
                break
            shape = BatchShape.trusted(_NO_TOKENS, _NO_TOKENS, contexts + (j + 1))
            latency = self.cost_model.iteration_activity(shape, activity)
            if end_s + latency.total_s > cluster.cutoff_s:
                break
            latencies.append(latency)
            end_s += latency.total_s
            starts.append(end_s)
        return latencies, np.array(starts, dtype=np.float64)

    def _activities(
        self,
        token_ids: Callable[[], tuple[np.ndarray, np.ndarray]],
        groups: int,
        applied: bool,
        tokens_per_group: int,
    ) -> ActivityDraws:
        """Per group (iteration): its expert activity, and the groups' distinct experts per layer and quality
        proxies stacked; routed exactly (the tokens' request ids and positions from ``token_ids``, in ``groups``
        equal consecutive parts), or drawn from the statistical mode's tables with the next ``groups`` pairs of
        the instance's uniforms (the caller marks those of the iterations that happen used)."""
        step = self.step
        if step.statistical is not None:
            assert self._uniforms is not None  # made with the replica wherever its step is statistical
            return step.statistical.draw(tokens_per_group, applied, self._uniforms.peek(groups))
        request_ids, positions = token_ids()
        return step.exact_activities(self.cost_model, request_ids, positions, groups, applied)

    def _execute(self, batch: ScheduledBatch) -> tuple[bool, LatencyBreakdown, np.ndarray, np.ndarray]:
        """Route the batch's tokens through every MoE layer and price the iteration."""
        applied = self.step.apply_to == "all" or not batch.has_prefill
        activities, distinct, proxies = self._activities(batch.token_ids, 1, applied, batch.num_tokens)
        decoding = batch.decoding
        prefill = ~decoding
        shape = BatchShape.trusted(
            batch.new_tokens[prefill], batch.computed_before[prefill], batch.computed_before[decoding] + 1
        )
        latency = self.cost_model.iteration_activity(shape, activities[0])
        if self._uniforms is not None:
            self._uniforms.advance(1)
        return applied, latency, distinct[0], proxies[:, 0]
