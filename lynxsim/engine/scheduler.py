"""Continuous batching as vLLM does it: which requests compute how many tokens in the next iteration.

With chunked prefill (vLLM v1's only mode) running requests go first, in admission order, each taking as many of
its missing tokens as the token budget leaves; waiting requests are then admitted while the budget, the sequence
limit and the KV cache allow, their prompts cut into chunks where needed. So one iteration mixes decode tokens and
prefill chunks. Without chunked prefill (vLLM v0's default) an iteration is either a prefill of whole prompts of
newly admitted requests, which takes priority, or a decode step of every running request: batches are pure.
When the KV cache runs out, the most recently admitted running request is preempted: its blocks are freed and it
goes back to the front of the queue, to recompute its prompt and generated tokens later (vLLM's recompute mode).

In disaggregated serving the same scheduler runs both kinds of instance: a prefill instance hands each request
off (``detach``) once its prompt is computed, and a decode instance receives requests whose KV cache is already
computed elsewhere; while their KV cache is in transfer they hold blocks and a sequence slot (``num_receiving``)
but are not scheduled.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from lynxsim.engine.kv_cache import BlockPool
from lynxsim.engine.request import Request


@dataclass
class ScheduledBatch:
    """One iteration: each request with the number of tokens it computes and how many it had computed."""

    requests: list[Request] = field(default_factory=list)
    new_tokens: list[int] = field(default_factory=list)
    computed_before: list[int] = field(default_factory=list)
    decoding: list[bool] = field(default_factory=list)

    def add(self, request: Request, tokens: int) -> None:
        computed = request.num_computed_tokens
        self.requests.append(request)
        self.new_tokens.append(tokens)
        self.computed_before.append(computed)
        # Request.is_decoding, inlined: this runs for every running request in every iteration
        self.decoding.append(request.generated_tokens > 0 and request.num_tokens - computed == 1)

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def has_prefill(self) -> bool:
        return not all(self.decoding)

    @property
    def num_tokens(self) -> int:
        return sum(self.new_tokens)

    def token_ids(self) -> tuple[np.ndarray, np.ndarray]:
        """(request id, position) of every token computed in this iteration, request by request."""
        counts = np.asarray(self.new_tokens, dtype=np.int64)
        request_ids = np.repeat(np.asarray([r.request_id for r in self.requests], dtype=np.int64), counts)
        chunk_starts = np.cumsum(counts) - counts
        offsets = np.asarray(self.computed_before, dtype=np.int64) - chunk_starts
        positions = np.arange(int(counts.sum()), dtype=np.int64) + np.repeat(offsets, counts)
        return request_ids, positions


class Scheduler:
    def __init__(
        self, pool: BlockPool, *, max_num_seqs: int, max_num_batched_tokens: int, chunked_prefill: bool
    ) -> None:
        self.pool = pool
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.chunked_prefill = chunked_prefill
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.num_receiving = 0  # requests whose KV cache is being transferred in: they hold a sequence slot

    def rejection_reason(self, request: Request, max_tokens: int | None = None) -> str | None:
        """Why a request can never be served with these limits, or None if it can. ``max_tokens``: the most
        tokens the request will hold here (default all of them; a prefill instance holds only the prompt)."""
        tokens = request.max_tokens if max_tokens is None else max_tokens
        if self.pool.blocks_for(tokens) > self.pool.num_blocks:
            return "exceeds_kv_cache"
        if not self.chunked_prefill and tokens > self.max_num_batched_tokens:
            return "exceeds_max_num_batched_tokens"
        return None

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def detach(self, requests: list[Request]) -> None:
        """Take running requests out of this scheduler, leaving their KV blocks allocated (a prefill instance
        hands requests off this way; it frees their blocks once their KV cache has been transferred)."""
        gone = {id(r) for r in requests}
        self.running = [r for r in self.running if id(r) not in gone]

    @property
    def is_idle(self) -> bool:
        return not self.waiting and not self.running

    def schedule(self, now_s: float) -> ScheduledBatch:
        """The next iteration's batch, starting at ``now_s`` (empty when there is nothing to compute)."""
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        if self.chunked_prefill:
            budget, preempted = self._schedule_running(batch, budget)
            if not preempted:
                self._admit_waiting(batch, budget, now_s, whole_prompts=False)
            return batch
        self._admit_waiting(batch, budget, now_s, whole_prompts=True)
        if not batch.requests:
            self._schedule_running(batch, budget)
        return batch

    def complete(self, batch: ScheduledBatch, now_s: float) -> tuple[int, list[Request]]:
        """Apply a finished iteration: returns the number of tokens sampled and the requests that finished."""
        sampled = 0
        finished: list[Request] = []
        for request, tokens in zip(batch.requests, batch.new_tokens):
            request.num_computed_tokens += tokens
            if request.num_tokens != request.num_computed_tokens:
                continue  # tokens still missing: a prompt chunk that is not the last one
            sampled += 1
            request.generated_tokens += 1
            request.num_tokens += 1
            if request.first_token_s is None:
                request.first_token_s = now_s
            if request.generated_tokens >= request.spec.output_tokens:  # Request.is_finished, inlined (hot)
                request.finish_s = now_s
                self.pool.release(request)
                finished.append(request)
        if finished:
            done = {id(r) for r in finished}
            self.running = [r for r in self.running if id(r) not in done]
        return sampled, finished

    def _schedule_running(self, batch: ScheduledBatch, budget: int) -> tuple[int, bool]:
        preempted = False
        index = 0
        pool = self.pool
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            tokens = min(request.num_tokens - request.num_computed_tokens, budget)  # its missing tokens
            while not pool.try_grow(request, request.num_computed_tokens + tokens):
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                if victim is request:
                    return budget, preempted
            batch.add(request, tokens)
            budget -= tokens
            index += 1
        return budget, preempted

    def _admit_waiting(self, batch: ScheduledBatch, budget: int, now_s: float, *, whole_prompts: bool) -> None:
        while self.waiting and budget > 0 and len(self.running) + self.num_receiving < self.max_num_seqs:
            request = self.waiting[0]
            if whole_prompts and request.missing_tokens > budget:
                return
            tokens = min(request.missing_tokens, budget)
            if not self.pool.try_grow(request, request.num_computed_tokens + tokens):
                return
            self.waiting.popleft()
            if request.first_scheduled_s is None:
                request.first_scheduled_s = now_s
            self.running.append(request)
            batch.add(request, tokens)
            budget -= tokens

    def _preempt(self, request: Request) -> None:
        self.pool.release(request)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)
