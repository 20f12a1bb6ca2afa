"""One serving instance (a replica: one GPU set with its own scheduler, KV cache and cost model), as a simpy
process that runs iterations back to back. Arrivals, routing between instances and KV-cache transfers belong to
the ``Cluster`` (lynxsim/engine/cluster.py) that the instance is part of; ``Replica.run`` is a one-instance cluster.

An instance has a role: ``colocated`` (prefill and decode on the same GPUs, the usual vLLM deployment),
``prefill`` (disaggregated: computes prompts only; the iteration that completes a prompt samples the first token,
then the request is handed to the cluster for a decode instance while this instance keeps its KV blocks until the
transfer is done) or ``decode`` (disaggregated: receives requests whose prompt is computed, allocates their KV
blocks, waits for the transfer, then decodes them; its batches are pure decode except after a preemption, which
recomputes the request's prompt and generated tokens on this instance).

Each iteration the scheduler forms a batch; the routing source gives the router logits of exactly the batch's
tokens for every MoE layer; the selection policy picks each token's experts (the configured policy on iterations
it applies to, plain top-k on the others); the per-layer expert activity and the batch shape go to the cost model,
whose latency is how long simulated time advances before the batch's tokens are sampled.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import simpy

from lynxsim.cost import BatchShape, CostModel, LatencyBreakdown
from lynxsim.engine.request import Request
from lynxsim.engine.scheduler import ScheduledBatch, Scheduler
from lynxsim.metrics import IterationLog
from lynxsim.policies import Policy
from lynxsim.policies.activity import expert_token_counts
from lynxsim.policies.proxies import QualityProxies, quality_proxies
from lynxsim.routing.base import RoutingSource
from lynxsim.workload.requests import RequestSpec

if TYPE_CHECKING:  # the cluster drives its instances, so it imports this module
    from lynxsim.engine.cluster import Cluster

Role = Literal["colocated", "prefill", "decode"]
ROLES: tuple[Role, ...] = ("colocated", "prefill", "decode")


@dataclass(frozen=True)
class RoutingStep:
    """How each iteration's experts are chosen: ``policy`` where it applies, ``baseline`` (top-k) elsewhere."""

    routing: RoutingSource
    policy: Policy
    baseline: Policy
    apply_to: Literal["decode_only", "all"]
    top_k: int
    renormalize: bool

    def applies(self, batch: ScheduledBatch) -> bool:
        return self.apply_to == "all" or not batch.has_prefill


class Replica:
    """One serving instance. ``run`` serves a list of arriving requests on this instance alone; after it every
    arrived request is in ``arrived`` with a status in ``statuses``: finished, rejected (can never fit) or cut off
    (running or waiting at the cut-off). In a ``Cluster`` the cluster holds those instead."""

    def __init__(
        self,
        scheduler: Scheduler,
        cost_model: CostModel,
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
        self.log = IterationLog(num_moe_layers, instance=index, role=role)
        self.arrived: list[Request] = []
        self.statuses: dict[int, str] = {}
        self.outstanding = 0  # requests routed here and not yet done here (the least-outstanding router's load)
        self.incoming: deque[Request] = deque()  # decode role: prefilled requests waiting for KV blocks here
        self.receiving: dict[int, Request] = {}  # decode role: KV cache in transfer to here, by request id
        self.cluster: Cluster | None = None  # set by the cluster this instance joins
        self._wakeup: simpy.Event | None = None

    def run(self, specs: Sequence[RequestSpec], cutoff_s: float | None) -> float:
        """Simulate this instance alone until every request is done (or ``cutoff_s``); returns the simulated end
        time in seconds."""
        from lynxsim.engine.cluster import Cluster

        cluster = Cluster([self])
        end_s = cluster.run(specs, cutoff_s)
        self.arrived, self.statuses = cluster.arrived, cluster.statuses
        return end_s

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
        while True:
            batch = self.scheduler.schedule(self.env.now)
            if self.incoming:
                self._receive(cluster)
            if not batch.requests:
                self._wakeup = self.env.event()
                yield self._wakeup
                continue
            start_s = self.env.now
            applied, latency, distinct, proxies = self._execute(batch)
            yield self.env.timeout(latency.total_s)
            sampled, finished = self.scheduler.complete(batch, self.env.now)
            for request in finished:
                cluster.finished(request, self)
            if hands_off and sampled:
                prefilled = [r for r in batch.requests if r.generated_tokens and not r.is_finished]
                if prefilled:
                    self.scheduler.detach(prefilled)
                    for request in prefilled:
                        cluster.prefilled(request, self)
            decode_tokens = sum(batch.decoding)
            self.log.append(
                start_s=start_s,
                latency=latency,
                prefill_tokens=batch.num_tokens - decode_tokens,
                decode_tokens=decode_tokens,
                sequences=len(batch),
                sampled_tokens=sampled,
                policy_applied=applied,
                distinct_experts=distinct,
                proxies=proxies,
                kv_used_fraction=self.scheduler.pool.used_fraction,
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

    def _execute(self, batch: ScheduledBatch) -> tuple[bool, LatencyBreakdown, np.ndarray, QualityProxies]:
        """Route the batch's tokens through every MoE layer and price the iteration."""
        step = self.step
        request_ids, positions = batch.token_ids()
        logits = step.routing.logits(request_ids, positions)
        applied = step.applies(batch)
        policy = step.policy if applied else step.baseline
        selection = policy.select(logits, step.top_k, renormalize=step.renormalize)
        counts = expert_token_counts(selection.expert_ids, logits.shape[-1])
        if policy is step.baseline:
            proxies = QualityProxies.of_topk(logits.shape[0])
        else:
            proxies = quality_proxies(logits, selection, step.top_k)
        decoding = np.asarray(batch.decoding)
        new_tokens = np.asarray(batch.new_tokens, dtype=np.int64)
        computed = np.asarray(batch.computed_before, dtype=np.int64)
        shape = BatchShape(
            prefill_chunk_tokens=new_tokens[~decoding],
            prefill_context_tokens=computed[~decoding],
            decode_context_tokens=computed[decoding] + 1,
        )
        latency = self.cost_model.iteration(shape, counts)
        return applied, latency, (counts > 0).sum(axis=-1), proxies
