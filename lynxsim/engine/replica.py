"""One serving replica on one GPU, as simpy processes: requests arrive, iterations run back to back.

Each iteration the scheduler forms a batch; the routing source gives the router logits of exactly the batch's
tokens for every MoE layer; the selection policy picks each token's experts (the configured policy on iterations
it applies to, plain top-k on the others); the per-layer expert activity and the batch shape go to the cost model,
whose latency is how long simulated time advances before the batch's tokens are sampled.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

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
    """Serves a fixed list of arriving requests; after ``run`` every arrived request is in ``arrived`` with a
    status in ``statuses``: finished, rejected (can never fit) or cut off (running or waiting at the cut-off)."""

    def __init__(self, scheduler: Scheduler, cost_model: CostModel, step: RoutingStep, num_moe_layers: int) -> None:
        self.scheduler = scheduler
        self.cost_model = cost_model
        self.step = step
        self.env = simpy.Environment()
        self.log = IterationLog(num_moe_layers)
        self.arrived: list[Request] = []
        self.statuses: dict[int, str] = {}
        self._arrivals_done = False
        self._wakeup: simpy.Event | None = None

    def run(self, specs: Sequence[RequestSpec], cutoff_s: float | None) -> float:
        """Simulate until every request is done (or ``cutoff_s``); returns the simulated end time in seconds."""
        self.env.process(self._arrivals(specs))
        server = self.env.process(self._serve())
        self.env.run(until=server if cutoff_s is None else cutoff_s)
        for request in self.scheduler.running:
            self.statuses[request.request_id] = "cutoff_running"
        for request in self.scheduler.waiting:
            self.statuses[request.request_id] = "cutoff_waiting"
        return float(self.env.now)

    def _arrivals(self, specs: Sequence[RequestSpec]) -> Generator[simpy.Event, Any, None]:
        for spec in specs:
            if spec.arrival_s > self.env.now:
                yield self.env.timeout(spec.arrival_s - self.env.now)
            request = Request.arriving(spec)
            self.arrived.append(request)
            reason = self.scheduler.rejection_reason(request)
            if reason is not None:
                self.statuses[spec.request_id] = f"rejected_{reason}"
                continue
            self.scheduler.add(request)
            self._wake()
        self._arrivals_done = True
        self._wake()

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.triggered:
            self._wakeup.succeed()

    def _serve(self) -> Generator[simpy.Event, Any, None]:
        while True:
            batch = self.scheduler.schedule(self.env.now)
            if not batch.requests:
                if self._arrivals_done and self.scheduler.is_idle:
                    return
                self._wakeup = self.env.event()
                yield self._wakeup
                continue
            start_s = self.env.now
            applied, latency, distinct, proxies = self._execute(batch)
            yield self.env.timeout(latency.total_s)
            sampled, finished = self.scheduler.complete(batch, self.env.now)
            for request in finished:
                self.statuses[request.request_id] = "finished"
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
