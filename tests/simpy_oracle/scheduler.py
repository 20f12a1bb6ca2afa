"""The simpy oracle's scheduler: vLLM's continuous batching (``lynxsim.engine.scheduler`` states the rule) over
Python ``Request`` objects, as the first engine ran it.

In disaggregated serving the same scheduler runs both kinds of instance: a prefill instance hands each request
off (``complete(..., hand_off=True)``) once its prompt is computed, and a decode instance receives requests whose
KV cache is already computed elsewhere; while their KV cache is in transfer they hold blocks and a sequence slot
(``num_receiving``) but are not scheduled. The running requests are a ``RunningSet`` (parallel arrays,
tests/simpy_oracle/running.py); a batch is a contiguous range of it, which lets ``complete`` apply an iteration to
array slices.
"""

from __future__ import annotations

from collections import deque
from typing import NamedTuple

import numpy as np

from lynxsim.engine.scheduler import REJECTION_REASONS, ScheduledBatch, rejection_codes
from simpy_oracle.kv_cache import BlockPool
from simpy_oracle.request import Request
from simpy_oracle.running import RunningSet

_NO_TOKENS = np.zeros(0, dtype=np.int64)


class Completion(NamedTuple):
    """What a finished iteration did: tokens sampled, requests that finished, and (prefill instances) requests
    whose prompt is computed, handed off to a decode instance; both lists in admission order."""

    sampled: int
    finished: list[Request]
    handed_off: list[Request]


class Scheduler:
    """One instance's scheduler: its waiting queue, running set and KV-cache pool, and vLLM's batching rule, in
    plain Python: the oracle of ``lynxsim.engine.scheduler.Scheduler`` (the registered ``vllm``), built with the
    same keywords."""

    def __init__(
        self, pool: BlockPool, *, max_num_seqs: int, max_num_batched_tokens: int, chunked_prefill: bool
    ) -> None:
        self.pool = pool
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.chunked_prefill = chunked_prefill
        self.waiting: deque[Request] = deque()
        self.running = RunningSet(max_num_seqs)
        self.num_preemptions = 0
        self.num_receiving = 0  # requests whose KV cache is being transferred in: they hold a sequence slot

    def rejection_reason(self, request: Request, max_tokens: int | None = None) -> str | None:
        """Why a request can never be served with these limits, or None if it can. ``max_tokens``: the most
        tokens the request will hold here (default all of them; a prefill instance holds only the prompt)."""
        tokens = request.max_tokens if max_tokens is None else max_tokens
        code = int(self.rejection_codes(np.array([tokens], dtype=np.int64))[0])
        return REJECTION_REASONS[code - 1] if code else None

    def rejection_codes(self, max_tokens: np.ndarray) -> np.ndarray:
        """``rejection_reason`` of requests holding at most ``max_tokens`` tokens each, at once: the package's
        rule (``lynxsim.engine.scheduler.rejection_codes``)."""
        return rejection_codes(max_tokens, self.pool, self.max_num_batched_tokens, self.chunked_prefill)

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    @property
    def is_idle(self) -> bool:
        return not self.waiting and not self.running

    @property
    def decode_runs_allowed(self) -> bool:
        """Whether the engine may compute a stretch of pure-decode iterations as one decode run
        (``lynxsim.engine.decode_run``) instead of calling ``schedule`` each iteration. That holds where, with
        nothing waiting and every running request decoding within the token budget, ``schedule`` takes each
        running request for one token every iteration, as vLLM's rule does. A subclass with its own ``schedule``
        is asked every iteration unless it overrides this to say its rule keeps that too."""
        return type(self).schedule is Scheduler.schedule

    def schedule(self, now_s: float) -> ScheduledBatch:
        """The next iteration's batch, starting at ``now_s`` (empty when there is nothing to compute): the
        batching rule, which a plug-in scheduler replaces."""
        budget = self.max_num_batched_tokens
        first = 0
        if self.chunked_prefill:
            tokens, budget, preempted = self.schedule_running(budget)
            if not preempted:
                admitted, budget = self.admit_waiting(budget, now_s, whole_prompts=False)
                if admitted:
                    tokens = np.concatenate((tokens, np.asarray(admitted, dtype=np.int64)))
        else:
            first = len(self.running)
            admitted, budget = self.admit_waiting(budget, now_s, whole_prompts=True)
            tokens = np.asarray(admitted, dtype=np.int64)
            if not admitted:
                first = 0
                tokens, budget, _ = self.schedule_running(budget)
        return self.make_batch(first, tokens, self.max_num_batched_tokens - budget)

    def complete(self, batch: ScheduledBatch, now_s: float, *, hand_off: bool = False) -> Completion:
        """Apply a finished iteration: each request's new tokens are computed; those with none missing sample a
        token, and finish when it is their last. With ``hand_off`` (a prefill instance) every request with a
        sampled token that has more to generate leaves too, its KV blocks still allocated in the pool (the
        instance frees them once the KV cache has moved: ``BlockPool.take_over``)."""
        running = self.running
        span = slice(batch.first, batch.first + len(batch))
        computed = running.computed[span]
        computed += batch.new_tokens
        sampled = computed == running.num_tokens[span]
        count = int(np.count_nonzero(sampled))
        if not count:
            return Completion(0, [], [])
        generated = running.generated[span]
        generated += sampled
        running.num_tokens[span] += sampled
        for i in np.flatnonzero(sampled & (generated == 1)).tolist():  # a first token (kept through preemption)
            running.requests[batch.first + i].first_token_s = now_s
        leaving = sampled & (generated >= running.output[span])
        if hand_off:
            leaving |= generated > 0
        if not leaving.any():
            return Completion(count, [], [])
        mask = np.zeros(len(running), dtype=bool)
        mask[span] = leaving
        finished, handed_off = self._leave(mask, now_s)
        return Completion(count, finished, handed_off)

    def advance_decode_run(self, steps: int, now_s: float) -> tuple[list[Request], int]:
        """Apply ``steps`` pure-decode iterations of every running request at once (a decode run, sized by
        ``lynxsim.engine.decode_run`` so that no request finishes before the last and the KV blocks exist):
        what ``complete`` would do ``steps`` times. Returns the requests that finished with the last, and the KV
        blocks their finishing freed."""
        running = self.running
        n = len(running)
        running.computed[:n] += steps
        running.generated[:n] += steps
        running.num_tokens[:n] += steps
        blocks = np.maximum(-(-running.computed[:n] // self.pool.block_size_tokens), running.blocks[:n])
        self.pool.free_blocks -= int((blocks - running.blocks[:n]).sum())
        assert self.pool.free_blocks >= 0, "a decode run outgrew the KV cache it was sized for"
        running.blocks[:n] = blocks
        finished = running.generated[:n] >= running.output[:n]
        if not finished.any():
            return [], 0
        released = int(blocks[finished].sum())
        return self._leave(finished, now_s)[0], released

    def _leave(self, mask: np.ndarray, now_s: float) -> tuple[list[Request], list[Request]]:
        """Remove the running requests of ``mask``: the finished ones (their blocks freed) and the others, handed
        off with their blocks."""
        finished: list[Request] = []
        handed_off: list[Request] = []
        for request in self.running.remove(mask):
            if request.generated_tokens >= request.spec.output_tokens:  # Request.is_finished, inlined
                request.finish_s = now_s
                self.pool.release(request)
                finished.append(request)
            else:
                handed_off.append(request)
        return finished, handed_off

    def make_batch(self, first: int, tokens: np.ndarray, num_tokens: int) -> ScheduledBatch:
        """The batch of the running requests at ``first .. first + tokens.size - 1``, computing ``tokens`` each
        (``num_tokens`` in all): what ``schedule`` returns once its steps have given every request its blocks."""
        running = self.running
        span = slice(first, first + tokens.size)
        computed = running.computed[span].copy()
        decoding = (running.generated[span] > 0) & (running.num_tokens[span] - computed == 1)
        return ScheduledBatch(
            first, running.ids[span].copy(), tokens, computed, decoding, num_tokens, int(np.count_nonzero(decoding))
        )

    def schedule_running(self, budget: int) -> tuple[np.ndarray, int, bool]:
        """Tokens for the first running requests while the budget lasts, each taking its missing tokens or what
        is left, and the KV blocks for them: (tokens of the scheduled prefix, budget left, whether any request was
        preempted). When the pool holds every block needed, all at once; otherwise request by request,
        preempting the most recently admitted ones (``_schedule_running_preempting``)."""
        running = self.running
        n = len(running)
        if not n or budget <= 0:
            return _NO_TOKENS, budget, False
        computed = running.computed[:n]
        missing = running.num_tokens[:n] - computed
        ends = np.cumsum(missing)
        if ends[-1] <= budget:
            tokens, left = missing, budget - int(ends[-1])
        else:  # the first requests whose missing tokens start within the budget; the last takes what is left
            count = int(np.searchsorted(ends - missing, budget))
            tokens, left = missing[:count], 0
            tokens[-1] -= int(ends[count - 1]) - budget
        count = tokens.size
        held = running.blocks[:count]
        extra = -(-(computed[:count] + tokens) // self.pool.block_size_tokens) - held
        np.maximum(extra, 0, out=extra)
        needed = int(extra.sum())
        if needed > self.pool.free_blocks:
            return self._schedule_running_preempting(budget)
        held += extra
        self.pool.free_blocks -= needed
        return tokens, left, False

    def _schedule_running_preempting(self, budget: int) -> tuple[np.ndarray, int, bool]:
        """``schedule_running`` when the pool runs short: request by request, in admission order, each growing
        its blocks; while the pool cannot grow one, the most recently admitted request is preempted (possibly
        that one itself, which ends the scheduling of running requests)."""
        running = self.running
        tokens: list[int] = []
        preempted = False
        index = 0
        while index < len(running) and budget > 0:
            take = min(int(running.num_tokens[index] - running.computed[index]), budget)
            while not self._try_grow(index, int(running.computed[index]) + take):
                victim = len(running) - 1
                self._preempt(running.pop())
                preempted = True
                if victim == index:
                    return np.asarray(tokens, dtype=np.int64), budget, preempted
            tokens.append(take)
            budget -= take
            index += 1
        return np.asarray(tokens, dtype=np.int64), budget, preempted

    def _try_grow(self, index: int, tokens: int) -> bool:
        """``BlockPool.try_grow`` for the running request at ``index``."""
        extra = self.pool.blocks_for(tokens) - int(self.running.blocks[index])
        if extra > self.pool.free_blocks:
            return False
        if extra > 0:
            self.pool.free_blocks -= extra
            self.running.blocks[index] += extra
        return True

    def admit_waiting(self, budget: int, now_s: float, *, whole_prompts: bool) -> tuple[list[int], int]:
        """Admit waiting requests, in order, while the budget, the sequence limit and the KV cache allow (with
        ``whole_prompts``, only while a request's missing tokens fit the budget whole): the tokens each computes,
        and the budget left. The admitted requests are appended to the running set, after the ones scheduled."""
        admitted: list[int] = []
        while self.waiting and budget > 0 and len(self.running) + self.num_receiving < self.max_num_seqs:
            request = self.waiting[0]
            if whole_prompts and request.missing_tokens > budget:
                break
            tokens = min(request.missing_tokens, budget)
            if not self.pool.try_grow(request, request.num_computed_tokens + tokens):
                break
            self.waiting.popleft()
            if request.first_scheduled_s is None:
                request.first_scheduled_s = now_s
            self.running.append(request)
            admitted.append(tokens)
            budget -= tokens
        return admitted, budget

    def _preempt(self, request: Request) -> None:
        self.pool.release(request)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)
