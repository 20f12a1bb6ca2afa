"""Continuous batching as vLLM does it, and the interface of every scheduler an experiment can name.

With chunked prefill (vLLM v1's only mode) running requests go first, in admission order, each taking as many of
its missing tokens as the token budget leaves; waiting requests are then admitted while the budget, the sequence
limit and the KV cache allow, their prompts cut into chunks where needed. So one iteration mixes decode tokens and
prefill chunks. Without chunked prefill (vLLM v0's default) an iteration is either a prefill of whole prompts of
newly admitted requests, which takes priority, or a decode step of every running request: batches are pure.
When the KV cache runs out, the most recently admitted running request is preempted: its blocks are freed and it
goes back to the front of the queue, to recompute its prompt and generated tokens later (vLLM's recompute mode).
A batch is always a contiguous range of the running requests (running ones are scheduled as a prefix, admitted
ones appended after them).

The rule and its steps run in the compiled engine's loop (``lynxsim.engine.compiled.kernel``: ``_schedule``,
``_schedule_running``, ``_admit_waiting``), over the instance's arrays. ``Scheduler`` is registered as ``vllm``
(``lynxsim.plugins.SCHEDULERS``); the loop runs its rule inline. A plug-in scheduler subclasses it and replaces
``schedule``, built from the same steps (``schedule_running``, ``admit_waiting``, ``make_batch``), which run on
the instance's state: the loop then asks Python for each batch (``kernel.NEED_SCHEDULE``), and the KV-cache
accounting, preemption, completion and hand-offs stay the engine's, so every rule keeps its invariants
(docs/extending.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from lynxsim.engine.compiled import kernel as k
from lynxsim.engine.compiled.prefix_cache import PrefixCache
from lynxsim.engine.kv_cache import BlockPool

REJECTION_REASONS = ("exceeds_kv_cache", "exceeds_max_num_batched_tokens")
"""Why a request can never be served (``Scheduler.rejection_codes``), in the order they are checked."""


@dataclass(frozen=True, slots=True)
class ScheduledBatch:
    """One iteration: the running requests at positions ``first .. first + len - 1`` of the running set, each with
    the tokens it computes (``new_tokens``), the tokens it had computed (``computed_before``) and whether it is a
    decode step (``decoding``: one missing token that it generated itself)."""

    first: int
    request_ids: np.ndarray
    new_tokens: np.ndarray
    computed_before: np.ndarray
    decoding: np.ndarray
    num_tokens: int
    num_decode_tokens: int

    def __len__(self) -> int:
        return int(self.new_tokens.size)

    @property
    def has_prefill(self) -> bool:
        return self.num_decode_tokens < self.new_tokens.size

    def token_ids(self) -> tuple[np.ndarray, np.ndarray]:
        """(request id, position) of every token computed in this iteration, request by request."""
        return batch_token_ids(self.request_ids, self.new_tokens, self.computed_before)


def batch_token_ids(
    request_ids: np.ndarray, new_tokens: np.ndarray, computed_before: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(request id, position) of every token of a batch whose requests ``request_ids`` compute ``new_tokens``
    tokens each after their ``computed_before`` cached ones, request by request (what a batch routes)."""
    request_tokens = np.repeat(request_ids, new_tokens)
    chunk_starts = np.cumsum(new_tokens) - new_tokens
    offsets = computed_before - chunk_starts
    positions = np.arange(int(new_tokens.sum()), dtype=np.int64) + np.repeat(offsets, new_tokens)
    return request_tokens, positions


def rejection_codes(
    max_tokens: np.ndarray, pool: BlockPool, max_num_batched_tokens: int, chunked_prefill: bool
) -> np.ndarray:
    """Why requests holding at most ``max_tokens`` tokens each can never be served by an instance with a KV cache
    of ``pool``'s size and these limits: 0 where one can, else 1 + the index of its reason in
    ``REJECTION_REASONS`` (the first that applies)."""
    codes = np.zeros(max_tokens.shape, dtype=np.int64)
    if not chunked_prefill:
        codes[max_tokens > max_num_batched_tokens] = 2
    codes[-(-max_tokens // pool.block_size_tokens) > pool.num_blocks] = 1
    return codes


class InstanceArrays(Protocol):
    """The arrays of one instance that the batching steps read and change (``compiled.instance.CompiledInstance``
    holds them; ``kernel``'s constants index them)."""

    request_ids: np.ndarray
    req_i: np.ndarray
    req_f: np.ndarray
    queue: np.ndarray
    slots: np.ndarray
    state: np.ndarray
    config: np.ndarray
    batch_new: np.ndarray
    batch_before: np.ndarray
    batch_decoding: np.ndarray
    prefix: PrefixCache


class RequestQueue:
    """A read-only view of an instance's running or waiting requests, in order (running: admission order;
    waiting: the front first)."""

    def __init__(self, ids: np.ndarray) -> None:
        self.ids = ids  # request ids

    def __len__(self) -> int:
        return int(self.ids.size)


class Scheduler:
    """One instance's batching rule and serving limits: vLLM's rule (module docstring). A factory of any
    registered scheduler is called with ``pool``, ``max_num_seqs``, ``max_num_batched_tokens`` and
    ``chunked_prefill`` by keyword; the engine binds the scheduler to the instance it serves (``bind``)."""

    def __init__(
        self, pool: BlockPool, *, max_num_seqs: int, max_num_batched_tokens: int, chunked_prefill: bool
    ) -> None:
        self.pool = pool
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.chunked_prefill = chunked_prefill
        self._instance: InstanceArrays | None = None
        self._filled = 0  # batch tokens the steps of the batch being formed have written
        self._admitted = 0  # requests those steps admitted

    # ----- limits -----

    def rejection_codes(self, max_tokens: np.ndarray) -> np.ndarray:
        """Why requests holding at most ``max_tokens`` tokens each can never be served with these limits
        (``rejection_codes``)."""
        return rejection_codes(max_tokens, self.pool, self.max_num_batched_tokens, self.chunked_prefill)

    @property
    def rule_is_builtin(self) -> bool:
        """Whether ``schedule`` is vLLM's rule, which the compiled loop runs itself; otherwise the loop asks this
        object for each batch."""
        return type(self).schedule is Scheduler.schedule

    def bind(self, instance: InstanceArrays | None) -> None:
        """Serve ``instance``: the steps below read and change its state (None: none; the engine unbinds a
        scheduler when its run ends, so that the instance's arrays go with the run, not with the garbage collector:
        a warm statistical run was 60% slower while the last run's arrays waited for it)."""
        self._instance = instance

    # ----- the instance's state, read-only -----

    @property
    def running(self) -> RequestQueue:
        """The running requests, in admission order."""
        instance = self._bound
        rows = instance.slots[k.SL_REQUEST, : int(instance.state[k.S_RUNNING])]
        return RequestQueue(instance.request_ids[rows])

    @property
    def waiting(self) -> RequestQueue:
        """The waiting requests (preempted ones first, then arrivals in order)."""
        instance = self._bound
        head, count = int(instance.state[k.S_WQ_HEAD]), int(instance.state[k.S_WQ_COUNT])
        rows = instance.queue[(head + np.arange(count)) % instance.queue.size]
        return RequestQueue(instance.request_ids[rows])

    # ----- the rule and its steps -----

    def schedule(self, now_s: float) -> ScheduledBatch:
        """The next iteration's batch, starting at ``now_s`` (empty when there is nothing to compute): the
        batching rule, which a plug-in scheduler replaces."""
        instance = self._bound
        k.schedule_step(instance.req_i, instance.req_f, instance.slots, instance.queue, instance.state,
                        instance.config, instance.batch_new, instance.batch_before, instance.batch_decoding, now_s,
                        instance.prefix)
        return self._batch()

    def schedule_running(self, budget: int) -> tuple[np.ndarray, int, bool]:
        """Tokens for the first running requests while the budget lasts, each taking its missing tokens or what
        is left, and the KV blocks for them: (tokens of the scheduled prefix, budget left, whether any request was
        preempted, the most recently admitted first, to make room). Call it before ``admit_waiting``."""
        instance = self._bound
        count, left, preempted = k.schedule_running_step(instance.req_i, instance.slots, instance.queue,
                                                         instance.state, instance.config, instance.batch_new,
                                                         budget, instance.prefix)
        self._filled = count
        return instance.batch_new[:count].copy(), left, bool(preempted)

    def admit_waiting(self, budget: int, now_s: float, *, whole_prompts: bool) -> tuple[list[int], int]:
        """Admit waiting requests, in order, while the budget, the sequence limit and the KV cache allow (with
        ``whole_prompts``, only while a request's missing tokens fit the budget whole): the tokens each computes,
        and the budget left. The admitted requests join the running set after the ones scheduled."""
        instance = self._bound
        at = self._filled
        admitted, left = k.admit_waiting_step(instance.req_i, instance.req_f, instance.slots, instance.queue,
                                              instance.state, instance.config, instance.batch_new, at, budget,
                                              now_s, whole_prompts, instance.prefix)
        self._filled = at + admitted
        self._admitted += admitted
        return instance.batch_new[at : at + admitted].tolist(), left

    def make_batch(self, first: int, tokens: np.ndarray, num_tokens: int) -> ScheduledBatch:
        """The batch of the running requests at ``first .. first + tokens.size - 1``, computing ``tokens`` each
        (``num_tokens`` in all): what ``schedule`` returns once its steps have given every request its blocks."""
        instance = self._bound
        tokens = np.asarray(tokens, dtype=np.int64)
        if first < 0 or first + tokens.size > int(instance.state[k.S_RUNNING]):
            raise ValueError(f"a batch of running requests {first} .. {first + tokens.size - 1} of "
                             f"{int(instance.state[k.S_RUNNING])}")
        instance.batch_new[: tokens.size] = tokens
        k.set_batch(instance.slots, instance.state, instance.batch_before, instance.batch_decoding, first,
                    tokens.size, num_tokens, self._admitted)
        return self._batch()

    def start_batch(self) -> None:
        """Before the rule forms a batch (the engine calls it): no step has written anything yet."""
        self._filled = 0
        self._admitted = 0

    @property
    def _bound(self) -> InstanceArrays:
        if self._instance is None:
            raise RuntimeError("a scheduler's steps run on the instance the engine binds it to")
        return self._instance

    def _batch(self) -> ScheduledBatch:
        """The batch the state now holds (``state[S_BATCH_*]`` and the batch buffers)."""
        instance = self._bound
        state = instance.state
        first, count = int(state[k.S_BATCH_FIRST]), int(state[k.S_BATCH_LEN])
        rows = instance.slots[k.SL_REQUEST, first : first + count]
        return ScheduledBatch(first, instance.request_ids[rows], instance.batch_new[:count].copy(),
                              instance.batch_before[:count].copy(), instance.batch_decoding[:count].copy(),
                              int(state[k.S_BATCH_TOKENS]), int(state[k.S_BATCH_DECODE]))
