"""The engine's loop: one serving instance, iteration after iteration, in numba; every deployment runs on it.

Decision for decision (the first, simpy engine in tests/simpy_oracle is held to the same records): arrivals join
the waiting queue (or are rejected), the scheduler forms each batch as vLLM does (running requests first, then
admissions; chunked prefill or whole prompts; preemption of the most recently admitted when the KV cache runs
short), the iteration is routed, priced (``pricing.price_iteration``), advanced and logged. An instance has a role
(``ROLE_*``): co-located; prefill (a request whose first token is sampled is handed off, its blocks held until its
KV cache has moved: ``frees``); decode (handed-off requests wait in ``incoming`` for KV blocks, then for their
transfer, ``receiving``, then join the running set). It stops at its horizon (``HORIZON``: it starts no iteration
at or after it; a prefill instance also completes no iteration past it) so that the orchestrator can bring it
inputs in time, and writes what others must know to its outbox (``EV_*``).
What it cannot do here it asks the caller for and returns (``simulate`` is re-entered until ``DONE``):

* ``ROUTE``: exact routing of the batch in the batch buffers (the caller routes it, fills routing row 0);
* ``ROUTE_RUN``: exact routing of the next ``groups`` pure-decode iterations of the running requests (the caller
  fills rows ``0 .. groups - 1``); the loop then takes each iteration's row while the batch stays that decode
  batch (``lynxsim.engine.decode_run``);
* ``NEED_LOG`` / ``NEED_UNIFORMS``: the iteration log or the statistical mode's uniforms need more room;
* ``PROGRESS``: another ``progress_every`` requests arrived;
* ``TOO_MANY_TOKENS``: a statistical table does not cover the batch (the caller raises the simpy path's error);
* ``NON_FINITE``: routing in the loop met non-finite logits (the caller raises ``route_counts``' error);
* ``HORIZON`` / ``NEED_OUTBOX``: the horizon is reached / the outbox is full;
* ``NEED_PRICE``: a cost model without formulas here (a plug-in's) prices the routed batch (into ``clock``);
* ``NEED_SCHEDULE``: a plug-in scheduler forms the batch, through this module's batching steps.

Where ``routing.FusedRouting`` is enabled (synthetic routing, one top-k or Lynx policy) the loop routes exact
batches itself instead of returning ``ROUTE`` / ``ROUTE_RUN``, with the same kernels as the caller would.

In the statistical mode the activity is drawn here (``ActivityTable.draw``'s rule) and nothing is returned
until the end. State lives in arrays that the caller keeps between calls (``state`` for counters, indexed by the
``S_*`` constants; ``clock`` for times), so re-entering resumes exactly where the loop stopped.

Ties: an arrival at the very time an iteration ends is admitted by the next iteration (simpy orders equal times
by when each event was scheduled, which this loop does not track); an iteration ending exactly at the cut-off
is completed. Both are measure-zero events in continuous time.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from lynxsim.cost_formulas import kv_transfer_s
from lynxsim.engine.compiled import prefix_cache as prefix
from lynxsim.engine.compiled.offloading import Residency, fetch_and_price
from lynxsim.engine.compiled.prefix_cache import PrefixCache
from lynxsim.engine.compiled.pricing import Pricing, price_iteration
from lynxsim.engine.compiled.routing import FusedRouting, admit_means
from lynxsim.jit import compiled, internal

# Return codes of ``simulate``.
DONE, ROUTE, ROUTE_RUN, NEED_LOG, NEED_UNIFORMS, PROGRESS, TOO_MANY_TOKENS, NON_FINITE, HORIZON, NEED_OUTBOX = range(10)
NEED_PRICE, NEED_SCHEDULE = 10, 11

# Request statuses (``req_i[R_STATUS]``); the driver names them. ``ST_HANDED_OFF``: a prefill instance's request
# whose prompt is computed, gone to a decode instance (its record continues there).
ST_NONE, ST_FINISHED, ST_REJECTED_KV, ST_REJECTED_BATCH, ST_CUTOFF_RUNNING, ST_CUTOFF_WAITING = 0, 1, 2, 3, 4, 5
ST_HANDED_OFF = 6

# Instance roles (``config[K_ROLE]``), as ``lynxsim.engine.deployment.ROLES`` orders them.
ROLE_COLOCATED, ROLE_PREFILL, ROLE_DECODE = 0, 1, 2

# Kinds of the events an instance writes to its outbox (``config[K_OUTBOX]`` on): a request finished here, a
# prefill instance handed a request off (its prompt computed), a decode instance allocated a request's KV blocks
# and started pulling its KV cache (the time written is the transfer's end, when the prefill side frees it).
EV_FINISH, EV_HANDOFF, EV_TRANSFER = 0, 1, 2

# Columns of the per-request integer array ``req_i`` (``[requests, REQUEST_INTS]``: a request's counters share a
# cache line, since the loop visits requests, not counters). Prefix caching (``prefix_cache``): where the request's
# block identities start and how many it has (0: none, or caching off), how many of its blocks are cached ones
# (the first ``R_CACHED`` of its ``R_BLOCKS``), and the prompt tokens its first admission found cached.
R_PROMPT, R_OUTPUT, R_TOKENS, R_COMPUTED, R_GENERATED, R_BLOCKS, R_PREEMPTIONS, R_STATUS, R_REJECT = range(9)
R_KEY_AT, R_KEYED, R_CACHED, R_HIT_TOKENS = 9, 10, 11, 12
REQUEST_INTS = 13
# Columns of the per-request float array ``req_f``. ``RF_INBOX``: when the request reaches this instance (its
# arrival; on a decode instance, its hand-off); ``RF_TRANSFER_*``: its KV-cache transfer (disaggregated serving).
RF_ARRIVAL, RF_SCHEDULED, RF_FIRST_TOKEN, RF_FINISH, RF_INBOX, RF_TRANSFER_START, RF_TRANSFER_END = range(7)
REQUEST_FLOATS = 7

# Rows of ``slots``, the running requests' counters in admission order (``[SLOT_FIELDS, max_num_seqs]``, the
# first ``state[S_RUNNING]`` columns in use): the loop visits them every iteration, contiguously; a request's row
# of ``req_i`` is stale while it runs and written back when it leaves.
SL_REQUEST, SL_TOKENS, SL_COMPUTED, SL_GENERATED, SL_OUTPUT, SL_BLOCKS, SL_CACHED, SL_KEYED = range(8)
SLOT_FIELDS = 8

# Entries of ``state``.
S_ARRIVED, S_WQ_HEAD, S_WQ_COUNT, S_RUNNING, S_FREE_BLOCKS, S_PHASE, S_EPOCH = 0, 1, 2, 3, 4, 5, 6
S_RUN_EPOCH, S_RUN_LENGTH, S_RUN_AT, S_ROWS, S_UNIFORM_AT, S_UNIFORMS = 7, 8, 9, 10, 11, 12
S_BATCH_LEN, S_BATCH_FIRST, S_BATCH_TOKENS, S_BATCH_DECODE, S_ROUTE_GROUPS, S_ROUTE_ROW = 13, 14, 15, 16, 17, 18
S_PROGRESS_MARK, S_APPLIED, S_ADMITTED = 19, 20, 21
# The inbox (requests given to this instance: ``state[S_PUSHED]`` rows of ``req_*``, in inbox-time order), the
# decode role's FIFO of prefilled requests waiting for KV blocks, its transfers in flight, the prefill role's
# transfers whose end frees blocks here, the outbox's events, and whether the cut-off ended this instance.
S_PUSHED, S_IN_HEAD, S_IN_COUNT, S_RECEIVING, S_FREES, S_OUTBOX, S_CUT = 22, 23, 24, 25, 26, 27, 28
# ``S_WAITING``: the last batch was empty; the instance schedules again only once an input reaches it (simpy's
# ``Replica.wake``), not at every time its clock is moved to (a horizon), since a schedule can change the state even
# when it forms no batch (a preemption, which keeps that step from admitting).
S_WAITING = 29
STATE_SIZE = 30
assert S_FREE_BLOCKS == prefix.S_FREE_BLOCKS
# Entries of ``clock``.
# ``C_PENDING_END`` and ``C_PRICE`` (6 entries, ``price_iteration``'s): an iteration priced and not yet
# completed (phase 2: a prefill instance waits there until it knows every transfer that ends before its end).
# ``C_NEXT_EVENT``: the next input this instance knows of, kept while the caller schedules (``NEED_SCHEDULE``).
C_NOW, C_END, C_LAST_LATENCY, C_PENDING_END, C_PRICE, C_NEXT_EVENT = 0, 1, 2, 3, 4, 10
CLOCK_SIZE = 11

# Entries of ``config``.
K_BLOCKS, K_BLOCK_TOKENS, K_MAX_SEQS, K_MAX_TOKENS, K_CHUNKED, K_APPLY_ALL, K_STATISTICAL, K_PROGRESS_EVERY = range(8)
K_MAX_RUN, K_ROLE, K_OUTBOX, K_PRICE_OUTSIDE, K_SCHEDULE_OUTSIDE = 8, 9, 10, 11, 12
# ``K_STOP_ON_FINISH``: a finish brings the horizon down to its time (closed-loop clients: the request a finish
# releases arrives no earlier than that, and the caller must give it before the next iteration is formed).
K_STOP_ON_FINISH = 13
CONFIG_SIZE = 14

# Entries of ``timing``: the cut-off, the horizon (the loop starts no iteration at or after it: an input may reach
# the instance then; ``HORIZON``), and the KV transfer's bytes per token, bandwidth (bytes/s) and fixed latency.
T_CUTOFF, T_HORIZON, T_KV_BYTES_PER_TOKEN, T_BANDWIDTH, T_LATENCY = range(5)
TIMING_SIZE = 5

# Rows of the log's float array ``log_f`` and integer array ``log_i``.
LF_START, LF_LATENCY, LF_KV_USED, LF_ATTENTION, LF_DENSE, LF_MOE, LF_COMMUNICATION, LF_OVERHEAD, LF_TOTAL = range(9)
LI_PREFILL, LI_DECODE, LI_SEQUENCES, LI_SAMPLED, LI_APPLIED = range(5)
# Expert offloading (``offloading.Residency`` enabled): the exposed fetch time (in ``LF_TOTAL``, not in the other
# parts) and the experts fetched, over every layer.
LF_OFFLOAD, LI_FETCHED = 9, 5
LOG_FLOATS, LOG_INTS = 10, 6


@compiled(inline="always")
def _transfer_s(timing: np.ndarray, tokens: int) -> float:
    """``KVTransfer.time_s`` with the transfer's parameters as ``timing`` holds them."""
    return kv_transfer_s(tokens, timing[T_KV_BYTES_PER_TOKEN], timing[T_BANDWIDTH], timing[T_LATENCY])


@compiled(inline="always")
def _blocks_for(tokens: int, block_tokens: int) -> int:
    return -(-tokens // block_tokens)


@compiled(inline="always")
def _try_grow(held: np.ndarray, row: int, column: int, tokens: int, state: np.ndarray, block_tokens: int,
              cache: PrefixCache) -> bool:
    """``BlockPool.try_grow`` for the request whose blocks ``held[row, column]`` counts (a running request's
    ``slots[SL_BLOCKS, i]``, another's ``req_i[r, R_BLOCKS]``): enough blocks to cache ``tokens`` tokens, or False
    (and no change)."""
    extra = _blocks_for(tokens, block_tokens) - held[row, column]
    if extra > state[S_FREE_BLOCKS]:
        return False
    if extra > 0:
        prefix.take_blocks(cache, state, extra)
        held[row, column] += extra
    return True


@compiled(inline="always")
def _release(req_i: np.ndarray, r: int, state: np.ndarray, cache: PrefixCache) -> None:
    """Request ``r`` lets go of its KV blocks (finished, preempted, or its KV cache moved to a decode instance)."""
    prefix.release(cache, state, req_i[r, R_KEY_AT], req_i[r, R_BLOCKS], req_i[r, R_CACHED])
    req_i[r, R_BLOCKS] = 0
    req_i[r, R_CACHED] = 0


@compiled(inline="always")
def _queue_at(queue: np.ndarray, state: np.ndarray, k: int) -> int:
    return queue[(state[S_WQ_HEAD] + k) % queue.size]


@compiled(inline="always")
def _push_back(queue: np.ndarray, state: np.ndarray, r: int) -> None:
    queue[(state[S_WQ_HEAD] + state[S_WQ_COUNT]) % queue.size] = r
    state[S_WQ_COUNT] += 1


@compiled(inline="always")
def _push_front(queue: np.ndarray, state: np.ndarray, r: int) -> None:
    state[S_WQ_HEAD] = (state[S_WQ_HEAD] - 1) % queue.size
    queue[state[S_WQ_HEAD]] = r
    state[S_WQ_COUNT] += 1


@compiled(inline="always")
def _pop_front(queue: np.ndarray, state: np.ndarray) -> None:
    state[S_WQ_HEAD] = (state[S_WQ_HEAD] + 1) % queue.size
    state[S_WQ_COUNT] -= 1


@compiled(inline="always")
def _write_back(req_i: np.ndarray, slots: np.ndarray, i: int) -> int:
    """The counters of slot ``i`` back into its request's row (it leaves the running set); returns the request."""
    r = slots[SL_REQUEST, i]
    req_i[r, R_TOKENS] = slots[SL_TOKENS, i]
    req_i[r, R_COMPUTED] = slots[SL_COMPUTED, i]
    req_i[r, R_GENERATED] = slots[SL_GENERATED, i]
    req_i[r, R_BLOCKS] = slots[SL_BLOCKS, i]
    req_i[r, R_CACHED] = slots[SL_CACHED, i]
    return r


@compiled(inline="always")
def _enter_running(req_i: np.ndarray, slots: np.ndarray, state: np.ndarray, r: int) -> None:
    """Request ``r`` joins the running set, last: its counters into the next slot."""
    i = state[S_RUNNING]
    slots[SL_REQUEST, i] = r
    slots[SL_TOKENS, i] = req_i[r, R_TOKENS]
    slots[SL_COMPUTED, i] = req_i[r, R_COMPUTED]
    slots[SL_GENERATED, i] = req_i[r, R_GENERATED]
    slots[SL_OUTPUT, i] = req_i[r, R_OUTPUT]
    slots[SL_BLOCKS, i] = req_i[r, R_BLOCKS]
    slots[SL_CACHED, i] = req_i[r, R_CACHED]
    slots[SL_KEYED, i] = req_i[r, R_KEYED]
    state[S_RUNNING] = i + 1
    state[S_EPOCH] += 1


@internal(inline="never")
def _preempt_last(req_i: np.ndarray, slots: np.ndarray, queue: np.ndarray, state: np.ndarray,
                  cache: PrefixCache) -> None:
    """``Scheduler._preempt`` of the most recently admitted running request (recompute mode)."""
    state[S_RUNNING] -= 1
    r = _write_back(req_i, slots, state[S_RUNNING])
    _release(req_i, r, state, cache)
    req_i[r, R_COMPUTED] = 0
    req_i[r, R_PREEMPTIONS] += 1
    _push_front(queue, state, r)
    state[S_EPOCH] += 1


@internal(inline="never")
def _schedule_running(
    req_i: np.ndarray, slots: np.ndarray, queue: np.ndarray, state: np.ndarray, config: np.ndarray,
    batch_new: np.ndarray, grow: np.ndarray, budget: int, cache: PrefixCache,
) -> tuple[int, int, bool]:
    """``Scheduler.schedule_running`` (and its preempting variant): tokens for the first running requests into
    ``batch_new``; returns (requests scheduled, budget left, whether any was preempted). ``grow``: scratch, the
    blocks each scheduled request needs."""
    n = state[S_RUNNING]
    if n == 0 or budget <= 0:
        return 0, budget, False
    block_tokens = config[K_BLOCK_TOKENS]
    count = 0
    start = 0
    needed = 0
    for i in range(n):  # running requests whose missing tokens start within the budget
        if start >= budget:
            break
        missing = slots[SL_TOKENS, i] - slots[SL_COMPUTED, i]
        take = min(missing, budget - start)
        batch_new[i] = take
        start += missing
        count += 1
        tokens = slots[SL_COMPUTED, i] + take
        held = slots[SL_BLOCKS, i]
        extra = 0
        if tokens > held * block_tokens:  # the division only where a request outgrows its blocks
            extra = _blocks_for(tokens, block_tokens) - held
        grow[i] = extra
        needed += extra
    left = budget - start if start <= budget else 0
    if needed <= state[S_FREE_BLOCKS]:
        if needed:
            for i in range(count):
                slots[SL_BLOCKS, i] += grow[i]
            prefix.take_blocks(cache, state, np.int64(needed))
        return count, left, False
    # The pool runs short: request by request, preempting the most recently admitted while one cannot grow.
    preempted = False
    index = 0
    left = budget
    while index < state[S_RUNNING] and left > 0:
        take = min(slots[SL_TOKENS, index] - slots[SL_COMPUTED, index], left)
        while not _try_grow(slots, SL_BLOCKS, index, slots[SL_COMPUTED, index] + take, state, block_tokens, cache):
            victim = state[S_RUNNING] - 1
            _preempt_last(req_i, slots, queue, state, cache)
            preempted = True
            if victim == index:
                return index, left, preempted
        batch_new[index] = take
        left -= take
        index += 1
    return index, left, preempted


@internal(inline="never")
def _admit_waiting(
    req_i: np.ndarray, req_f: np.ndarray, slots: np.ndarray, queue: np.ndarray, state: np.ndarray,
    config: np.ndarray, batch_new: np.ndarray, at: int, budget: int, now: float, whole_prompts: bool,
    cache: PrefixCache,
) -> tuple[int, int]:
    """``Scheduler.admit_waiting``: admissions appended to the running set and to ``batch_new`` from ``at``;
    returns (requests admitted, budget left). A request with nothing computed first takes the leading blocks the
    prefix cache holds (``prefix_cache.lookup``): their tokens are not computed again, and admitting it needs
    free blocks for the rest and for the cached blocks no one holds (vLLM's ``allocate_slots``)."""
    admitted = 0
    block_tokens = config[K_BLOCK_TOKENS]
    while state[S_WQ_COUNT] > 0 and budget > 0 and state[S_RUNNING] + state[S_RECEIVING] < config[K_MAX_SEQS]:
        r = _queue_at(queue, state, 0)
        hits = 0
        queued = 0
        if req_i[r, R_KEYED] > 0 and req_i[r, R_COMPUTED] == 0:
            hits, queued = prefix.lookup(cache, req_i[r, R_KEY_AT], req_i[r, R_KEYED], req_i[r, R_TOKENS],
                                         block_tokens)
        computed = req_i[r, R_COMPUTED] + hits * block_tokens
        missing = req_i[r, R_TOKENS] - computed
        if whole_prompts and missing > budget:
            break
        tokens = min(missing, budget)
        if hits:
            if _blocks_for(computed + tokens, block_tokens) - hits + queued > state[S_FREE_BLOCKS]:
                break
            prefix.hold_hits(cache, state, req_i[r, R_KEY_AT], hits)
            req_i[r, R_BLOCKS] = hits
            req_i[r, R_CACHED] = hits
            req_i[r, R_COMPUTED] = computed
        if not _try_grow(req_i, r, R_BLOCKS, computed + tokens, state, block_tokens, cache):
            break
        _pop_front(queue, state)
        if math.isnan(req_f[r, RF_SCHEDULED]):
            req_f[r, RF_SCHEDULED] = now
            req_i[r, R_HIT_TOKENS] = computed
        _enter_running(req_i, slots, state, r)
        batch_new[at + admitted] = tokens
        admitted += 1
        budget -= tokens
    return admitted, budget


@internal(inline="never")
def _schedule(
    req_i: np.ndarray, req_f: np.ndarray, slots: np.ndarray, queue: np.ndarray, state: np.ndarray,
    config: np.ndarray, batch_new: np.ndarray, batch_before: np.ndarray, batch_decoding: np.ndarray,
    grow: np.ndarray, now: float, cache: PrefixCache,
) -> None:
    """``Scheduler.schedule``: the next batch into the batch buffers and ``state[S_BATCH_*]`` (length 0: none);
    ``state[S_ADMITTED]``: how many requests it admitted, the last running slots."""
    budget = config[K_MAX_TOKENS]
    first = 0
    admitted = 0
    # One type for each argument of both calls (no literal True/False or 0): numba compiles a function once per
    # argument types, and literals are types of their own (a second _admit_waiting was 0.45 s of a cold start).
    whole_prompts = config[K_CHUNKED] == 0
    if not whole_prompts:
        count, budget, preempted = _schedule_running(req_i, slots, queue, state, config, batch_new, grow, budget,
                                                     cache)
        if not preempted:
            admitted, budget = _admit_waiting(req_i, req_f, slots, queue, state, config, batch_new, count,
                                              budget, now, whole_prompts, cache)
            count += admitted
    else:
        first = state[S_RUNNING]
        count, budget = _admit_waiting(req_i, req_f, slots, queue, state, config, batch_new, np.int64(0), budget,
                                       now, whole_prompts, cache)
        admitted = count
        if count == 0:
            first = 0
            count, budget, _ = _schedule_running(req_i, slots, queue, state, config, batch_new, grow, budget,
                                                 cache)
    _set_batch(slots, state, batch_before, batch_decoding, first, count, config[K_MAX_TOKENS] - budget, admitted)


@compiled(inline="always")
def _set_batch(
    slots: np.ndarray, state: np.ndarray, batch_before: np.ndarray, batch_decoding: np.ndarray, first: int,
    count: int, num_tokens: int, admitted: int,
) -> None:
    """The batch of running slots ``first .. first + count - 1`` (their new tokens already in ``batch_new``),
    ``num_tokens`` in all, ``admitted`` of them (the last running slots) admitted for it: its cached tokens and
    decode flags into the batch buffers, its size into ``state[S_BATCH_*]``."""
    state[S_ADMITTED] = admitted
    decode = 0
    for i in range(count):
        computed = slots[SL_COMPUTED, first + i]
        batch_before[i] = computed
        decoding = slots[SL_GENERATED, first + i] > 0 and slots[SL_TOKENS, first + i] - computed == 1
        batch_decoding[i] = decoding
        decode += decoding
    state[S_BATCH_LEN] = count
    state[S_BATCH_FIRST] = first
    state[S_BATCH_TOKENS] = num_tokens
    state[S_BATCH_DECODE] = decode


@compiled(inline="always")
def _record(outbox_i: np.ndarray, outbox_f: np.ndarray, state: np.ndarray, kind: int, r: int, time_s: float) -> None:
    """An event for the caller (``EV_*``): request ``r`` (this instance's row), at ``time_s``."""
    at = state[S_OUTBOX]
    outbox_i[at, 0] = kind
    outbox_i[at, 1] = r
    outbox_f[at] = time_s
    state[S_OUTBOX] = at + 1


@compiled(inline="always")
def _complete(
    req_i: np.ndarray, req_f: np.ndarray, slots: np.ndarray, state: np.ndarray, config: np.ndarray,
    timing: np.ndarray, batch_new: np.ndarray, now: float, means: np.ndarray, move_means: bool,
    outbox_i: np.ndarray, outbox_f: np.ndarray, cache: PrefixCache,
) -> int:
    """``Scheduler.complete`` of the batch in the buffers: returns the tokens sampled; finished requests leave
    the running set (order kept), their blocks freed, and with ``move_means`` the running slots' request means
    (``FusedRouting.means``) move with them. On a prefill instance every request with a sampled token leaves
    (handed off, its blocks kept until its transfer ends), and the horizon comes down to the earliest time its
    transfer could end (``max(now, decode clock) + transfer``): the blocks may come back then. Blocks with an
    identity that filled become cached (``prefix_cache.register``)."""
    first = state[S_BATCH_FIRST]
    block_tokens = config[K_BLOCK_TOKENS]
    count = state[S_BATCH_LEN]
    hands_off = config[K_ROLE] == ROLE_PREFILL
    sampled = 0
    leaving = 0
    for b in range(count):
        i = first + b
        computed = slots[SL_COMPUTED, i] + batch_new[b]
        slots[SL_COMPUTED, i] = computed
        if slots[SL_CACHED, i] < slots[SL_KEYED, i]:
            full = min(computed // block_tokens, slots[SL_KEYED, i])
            if full > slots[SL_CACHED, i]:
                prefix.register(cache, state, req_i[slots[SL_REQUEST, i], R_KEY_AT], slots[SL_CACHED, i], full)
                slots[SL_CACHED, i] = full
        if computed == slots[SL_TOKENS, i]:
            sampled += 1
            generated = slots[SL_GENERATED, i] + 1
            slots[SL_GENERATED, i] = generated
            slots[SL_TOKENS, i] = computed + 1
            if generated == 1:
                req_f[slots[SL_REQUEST, i], RF_FIRST_TOKEN] = now
            leaving += generated >= slots[SL_OUTPUT, i] or hands_off
    if leaving:
        kept = 0
        for i in range(state[S_RUNNING]):
            done = slots[SL_GENERATED, i] >= slots[SL_OUTPUT, i]
            if done or (hands_off and slots[SL_GENERATED, i] > 0):
                r = _write_back(req_i, slots, i)
                if done:
                    req_f[r, RF_FINISH] = now
                    _release(req_i, r, state, cache)
                    req_i[r, R_STATUS] = ST_FINISHED
                    if config[K_OUTBOX]:
                        _record(outbox_i, outbox_f, state, EV_FINISH, r, now)
                    if config[K_STOP_ON_FINISH]:
                        timing[T_HORIZON] = min(timing[T_HORIZON], now)
                else:
                    req_i[r, R_STATUS] = ST_HANDED_OFF
                    _record(outbox_i, outbox_f, state, EV_HANDOFF, r, now)
                    earliest_free = now + _transfer_s(timing, req_i[r, R_COMPUTED])
                    timing[T_HORIZON] = min(timing[T_HORIZON], earliest_free)
            else:
                if kept != i:
                    for field in range(SLOT_FIELDS):
                        slots[field, kept] = slots[field, i]
                    if move_means:  # element by element: a slice assignment compiles numba's shape-mismatch error
                        for layer in range(means.shape[1]):
                            for e in range(means.shape[2]):
                                means[kept, layer, e] = means[i, layer, e]
                kept += 1
        state[S_RUNNING] = kept
        state[S_EPOCH] += 1
    return sampled


@internal(inline="never")
def _apply_frees(req_i: np.ndarray, req_f: np.ndarray, frees: np.ndarray, state: np.ndarray, now: float,
                 cache: PrefixCache) -> float:
    """Prefill role: free the blocks of handed-off requests whose transfer has ended by ``now``; returns the
    earliest transfer end still to come (inf: none)."""
    upcoming = np.inf
    k = 0
    while k < state[S_FREES]:
        r = frees[k]
        end = req_f[r, RF_TRANSFER_END]
        if end <= now:
            _release(req_i, r, state, cache)
            state[S_WAITING] = 0
            state[S_FREES] -= 1
            frees[k] = frees[state[S_FREES]]
        else:
            upcoming = min(upcoming, end)
            k += 1
    return upcoming


@internal(inline="never")
def _take_received(
    req_i: np.ndarray, req_f: np.ndarray, slots: np.ndarray, receiving: np.ndarray, state: np.ndarray, now: float,
) -> tuple[int, float]:
    """Decode role: the requests whose KV cache has arrived by ``now`` join the running set, in the order their
    transfers ended; returns the first slot they took (``S_RUNNING`` if none) and the
    earliest transfer end still to come (inf: none)."""
    first_slot = state[S_RUNNING]
    while True:
        best = -1
        upcoming = np.inf
        for k in range(state[S_RECEIVING]):
            end = req_f[receiving[k], RF_TRANSFER_END]
            if end < upcoming:
                upcoming = end
                best = k
        if best < 0 or upcoming > now:
            return first_slot, upcoming
        r = receiving[best]
        for k in range(best, state[S_RECEIVING] - 1):  # keep the others in the order their transfers started
            receiving[k] = receiving[k + 1]
        state[S_RECEIVING] -= 1
        _enter_running(req_i, slots, state, r)
        state[S_WAITING] = 0


@internal(inline="never")
def _start_transfers(
    req_i: np.ndarray, req_f: np.ndarray, incoming: np.ndarray, receiving: np.ndarray, state: np.ndarray,
    config: np.ndarray, timing: np.ndarray, outbox_i: np.ndarray, outbox_f: np.ndarray, now: float,
    cache: PrefixCache,
) -> None:
    """Decode role: allocate KV blocks for prefilled requests, in the order they came,
    while none waits here, the sequence limit and the pool allow, and start pulling their KV caches."""
    block_tokens = config[K_BLOCK_TOKENS]
    while (state[S_IN_COUNT] > 0 and state[S_WQ_COUNT] == 0
           and state[S_RUNNING] + state[S_RECEIVING] < config[K_MAX_SEQS]):
        r = incoming[state[S_IN_HEAD] % incoming.size]
        if not _try_grow(req_i, r, R_BLOCKS, req_i[r, R_TOKENS], state, block_tokens, cache):
            return
        state[S_IN_HEAD] = (state[S_IN_HEAD] + 1) % incoming.size
        state[S_IN_COUNT] -= 1
        receiving[state[S_RECEIVING]] = r
        state[S_RECEIVING] += 1
        end = now + _transfer_s(timing, req_i[r, R_COMPUTED])
        req_f[r, RF_TRANSFER_START] = now
        req_f[r, RF_TRANSFER_END] = end
        _record(outbox_i, outbox_f, state, EV_TRANSFER, r, end)


@compiled(inline="always")
def _take_arrivals(req_i: np.ndarray, req_f: np.ndarray, queue: np.ndarray, incoming: np.ndarray, state: np.ndarray,
                   role: int, now: float, cutoff_s: float) -> None:
    """The inbox's requests that have reached the instance by ``now`` (and arrived before the cut-off) join its
    waiting queue, or are rejected; on a decode instance, its incoming queue."""
    while state[S_ARRIVED] < state[S_PUSHED] and req_f[state[S_ARRIVED], RF_INBOX] <= now \
            and req_f[state[S_ARRIVED], RF_ARRIVAL] < cutoff_s:
        r = state[S_ARRIVED]
        state[S_ARRIVED] += 1
        if role == ROLE_DECODE:
            incoming[(state[S_IN_HEAD] + state[S_IN_COUNT]) % incoming.size] = r
            state[S_IN_COUNT] += 1
            state[S_WAITING] = 0
        elif req_i[r, R_REJECT] != ST_NONE:
            req_i[r, R_STATUS] = req_i[r, R_REJECT]
        else:
            _push_back(queue, state, r)
            state[S_WAITING] = 0


@compiled(inline="always")
def _wait(clock: np.ndarray, state: np.ndarray, timing: np.ndarray, now: float, next_event_s: float) -> int:
    """Nothing to compute now: move the clock to the next input this instance knows of (-1: go on), or stop at
    the horizon (``HORIZON``), the cut-off or the end of all input (``DONE``)."""
    cutoff = timing[T_CUTOFF]
    horizon = timing[T_HORIZON]
    target = min(next_event_s, cutoff)
    if target < horizon:
        if target == cutoff:
            clock[C_NOW] = cutoff
            clock[C_END] = cutoff
            state[S_CUT] = 1
            return DONE
        clock[C_NOW] = max(now, target)
        return -1
    if horizon < np.inf:
        clock[C_NOW] = max(now, horizon)
        return HORIZON
    clock[C_END] = now
    return DONE


@compiled(cache=True)
def _plan_run(slots: np.ndarray, state: np.ndarray, config: np.ndarray, clock: np.ndarray,
              next_arrival_s: float) -> int:
    """``plan_decode_run``: how many pure-decode iterations of the running requests to route together (0: none,
    step the next iteration alone). Only where every running request decodes and nothing waits; bounded by the
    iterations that fit before the next input at the last iteration's latency, plus one (the simpy oracle
    routes up to twice as many: a Python routing call costs more than the iterations an arrival then wastes,
    where routing in the loop (``routing.route``) costs less). The length changes what is routed ahead, never a
    record."""
    n = state[S_RUNNING]
    if n == 0 or state[S_WQ_COUNT] > 0 or n > config[K_MAX_TOKENS]:
        return 0
    remaining = 1 << 62
    for i in range(n):
        if not (slots[SL_GENERATED, i] > 0 and slots[SL_TOKENS, i] - slots[SL_COMPUTED, i] == 1):
            return 0
        remaining = min(remaining, slots[SL_OUTPUT, i] - slots[SL_GENERATED, i])
    most = min(remaining, config[K_MAX_RUN])
    last = clock[C_LAST_LATENCY]
    until_arrival = next_arrival_s - clock[C_NOW]
    if last > 0 and until_arrival < np.inf:
        most = min(most, max(2, int(until_arrival / last) + 1))
    if most <= 1:
        return 0
    block_tokens = config[K_BLOCK_TOKENS]
    length = 0
    for step in range(1, most + 1):  # up to the first iteration whose new blocks exceed the free ones
        grown = 0
        for i in range(n):
            extra = _blocks_for(slots[SL_COMPUTED, i] + step, block_tokens) - slots[SL_BLOCKS, i]
            if extra > 0:
                grown += extra
        if grown > state[S_FREE_BLOCKS]:
            break
        length = step
    return length if length > 1 else 0


@compiled(inline="always")
def _draw(
    sizes: np.ndarray, distinct: np.ndarray, assignments: np.ndarray, proxies: np.ndarray,
    rank_distinct: np.ndarray, rank_assignments: np.ndarray, samples: int, num_tokens: int, u_size: float,
    u_sample: float, out_distinct: np.ndarray, out_assignments: np.ndarray, out_proxies: np.ndarray,
    out_rank_distinct: np.ndarray, out_rank_assignments: np.ndarray,
) -> bool:
    """``ActivityTable.draw`` of one iteration of ``num_tokens`` tokens; False outside the table. ``proxies``
    with no rows: top-k's (1, 1, 0, 0); ``rank_*`` with no rows: no expert parallelism."""
    if num_tokens < 1 or num_tokens > sizes[sizes.size - 1]:
        return False
    index = np.searchsorted(sizes, num_tokens, side="left")
    size = sizes[index]
    lower = sizes[index - 1] if size != num_tokens else size
    if size != num_tokens and u_size * (size - lower) >= num_tokens - lower:
        row = (index - 1) * samples + int(u_sample * samples)
        scale = num_tokens / lower
    else:
        row = index * samples + int(u_sample * samples)
        scale = num_tokens / size
    for layer in range(distinct.shape[1]):
        d = distinct[row, layer]
        out_distinct[layer] = d
        if size != num_tokens:
            out_assignments[layer] = max(np.int64(np.rint(assignments[row, layer] * scale)), np.int64(d))
        else:
            out_assignments[layer] = assignments[row, layer]
    if rank_distinct.shape[0]:
        for layer in range(distinct.shape[1]):
            for rank in range(rank_distinct.shape[2]):
                d = rank_distinct[row, layer, rank]
                out_rank_distinct[layer, rank] = d
                if size != num_tokens:
                    scaled = np.int64(np.rint(rank_assignments[row, layer, rank] * scale))
                    out_rank_assignments[layer, rank] = max(scaled, np.int64(d))
                else:
                    out_rank_assignments[layer, rank] = rank_assignments[row, layer, rank]
    if proxies.shape[1] == 0:
        for layer in range(distinct.shape[1]):
            out_proxies[0, layer] = 1.0
            out_proxies[1, layer] = 1.0
            out_proxies[2, layer] = 0.0
            out_proxies[3, layer] = 0.0
    else:
        for k in range(4):
            for layer in range(distinct.shape[1]):
                out_proxies[k, layer] = proxies[k, row, layer]
    return True


@compiled(cache=True)
def finish_cut_off(req_i: np.ndarray, req_f: np.ndarray, queue: np.ndarray, incoming: np.ndarray,
                   receiving: np.ndarray, slots: np.ndarray, state: np.ndarray, config: np.ndarray,
                   timing: np.ndarray) -> None:
    """The cut-off statuses of the requests still running or waiting here, running requests' counters written
    back, once the instance is done; requests that reached it before the cut-off while its last iteration ran (or
    after it stopped) join its queues first, and on a decode instance those whose KV cache arrived before the
    cut-off join its running set, as they would have (simpy: at the transfer's end)."""
    _take_arrivals(req_i, req_f, queue, incoming, state, config[K_ROLE], np.inf, timing[T_CUTOFF])
    if config[K_ROLE] == ROLE_DECODE:
        _take_received(req_i, req_f, slots, receiving, state, np.nextafter(timing[T_CUTOFF], -np.inf))
    for i in range(state[S_RUNNING]):
        req_i[_write_back(req_i, slots, i), R_STATUS] = ST_CUTOFF_RUNNING
    state[S_RUNNING] = 0
    for k in range(state[S_WQ_COUNT]):
        req_i[_queue_at(queue, state, k), R_STATUS] = ST_CUTOFF_WAITING


@compiled(cache=True)
def simulate(
    config: np.ndarray,
    timing: np.ndarray,
    req_i: np.ndarray,
    req_f: np.ndarray,
    queue: np.ndarray,
    incoming: np.ndarray,
    receiving: np.ndarray,
    frees: np.ndarray,
    outbox_i: np.ndarray,
    outbox_f: np.ndarray,
    slots: np.ndarray,
    state: np.ndarray,
    clock: np.ndarray,
    batch_new: np.ndarray,
    batch_before: np.ndarray,
    batch_decoding: np.ndarray,
    route_distinct: np.ndarray,
    route_assignments: np.ndarray,
    route_proxies: np.ndarray,
    route_rank_distinct: np.ndarray,
    route_rank_assignments: np.ndarray,
    pricing: Pricing,
    cache: PrefixCache,
    fused: FusedRouting,
    route: Callable[..., bool],
    policy_table: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    baseline_table: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    samples: np.ndarray,
    uniforms: np.ndarray,
    log_f: np.ndarray,
    log_i: np.ndarray,
    log_distinct: np.ndarray,
    log_proxies: np.ndarray,
    residency: Residency,
) -> int:
    """Run the instance until it is done, reaches its horizon or needs the caller (the module docstring's
    return codes).

    ``timing``: the ``T_*`` entries (the horizon may come down during the call: a prefill instance's hand-off).
    The inbox: the first ``state[S_PUSHED]`` rows of ``req_i``/``req_f``, in ``RF_INBOX`` order; ``incoming``
    (decode role: a ring of request rows waiting for blocks), ``receiving`` (decode role: rows in transfer),
    ``frees`` (prefill role: handed-off rows whose transfer end, ``RF_TRANSFER_END``, the caller has written);
    ``outbox_i``/``outbox_f``: the ``EV_*`` events (kind, row; time). ``policy_table`` / ``baseline_table``: a
    statistical table's (sizes, distinct, assignments, proxies, rank_distinct, rank_assignments), flattened to
    ``[rows, layers]`` (proxies ``[4, rows, layers]``, no rows: top-k's; per EP rank ``[rows, layers, ranks]``,
    no rows: no expert parallelism); ``samples`` their sample counts. ``route_*``: the routing rows
    (``[iterations, layers]``, per rank ``[iterations, layers, ranks]``) the caller fills in exact mode.
    ``cache``: the prefix cache (``prefix_cache``). ``fused``/``route``: exact routing in the loop,
    ``routing.route`` (through a pointer to its compiled code, ``routing.route_function``: the loop's compilation
    neither includes nor waits for the routing's). ``log_*``: the iteration log's columns. ``residency``: expert
    offloading's state (``offloading``), advanced as each iteration is priced."""
    layers = log_distinct.shape[1]
    chunks = np.empty(batch_new.size, dtype=np.int64)
    chunk_contexts = np.empty(batch_new.size, dtype=np.int64)
    price = np.empty(6)
    grow = np.empty(batch_new.size, dtype=np.int64)
    role = config[K_ROLE]
    cutoff_s = timing[T_CUTOFF]
    while True:
        now = clock[C_NOW]
        if state[S_PHASE] == 0:
            if state[S_CUT]:
                return DONE
            if now >= timing[T_HORIZON]:
                return HORIZON
            if config[K_OUTBOX] and state[S_OUTBOX] + 2 * batch_new.size + 2 > outbox_f.size:
                return NEED_OUTBOX
            # Inputs up to now (simpy: before the iteration that starts now is formed): freed blocks, KV caches
            # received, arrivals (on a decode instance: hand-offs) joining the queue or rejected.
            next_event_s = np.inf
            if role == ROLE_PREFILL and state[S_FREES] > 0:
                next_event_s = _apply_frees(req_i, req_f, frees, state, now, cache)
            if role == ROLE_DECODE and state[S_RECEIVING] > 0:
                first_slot, next_event_s = _take_received(req_i, req_f, slots, receiving, state, now)
                if fused.enabled and state[S_RUNNING] > first_slot:
                    admit_means(fused, first_slot, state[S_RUNNING], slots[SL_REQUEST])
            _take_arrivals(req_i, req_f, queue, incoming, state, role, now, cutoff_s)
            if config[K_PROGRESS_EVERY] > 0 and state[S_ARRIVED] - state[S_PROGRESS_MARK] >= config[K_PROGRESS_EVERY]:
                state[S_PROGRESS_MARK] = state[S_ARRIVED]
                return PROGRESS
            if state[S_ARRIVED] < state[S_PUSHED] and req_f[state[S_ARRIVED], RF_ARRIVAL] < cutoff_s:
                next_event_s = min(next_event_s, req_f[state[S_ARRIVED], RF_INBOX])
            if state[S_WAITING] or (state[S_RUNNING] == 0 and state[S_WQ_COUNT] == 0 and state[S_IN_COUNT] == 0):
                code = _wait(clock, state, timing, now, next_event_s)
                if code >= 0:
                    return code
                continue
            if state[S_ROWS] >= log_f.shape[1]:
                return NEED_LOG
            if config[K_STATISTICAL] and state[S_UNIFORM_AT] >= state[S_UNIFORMS]:
                return NEED_UNIFORMS
            if not config[K_STATISTICAL] and not config[K_SCHEDULE_OUTSIDE] and state[S_RUN_AT] >= state[S_RUN_LENGTH]:
                length = _plan_run(slots, state, config, clock, min(next_event_s, timing[T_HORIZON]))
                if fused.enabled and length > 0:  # as many iterations as the loop's logits scratch holds
                    length = min(length, fused.token_requests.size // state[S_RUNNING])
                    length = length if length > 1 else 0
                if length > 0:
                    n = state[S_RUNNING]
                    for i in range(n):
                        batch_before[i] = slots[SL_COMPUTED, i]
                    state[S_BATCH_LEN] = n
                    state[S_ROUTE_GROUPS] = length
                    state[S_RUN_EPOCH] = state[S_EPOCH]
                    state[S_RUN_LENGTH] = length
                    state[S_RUN_AT] = 0
                    if not fused.enabled:
                        return ROUTE_RUN
                    # Arguments of the types in the routing pointer's signature (``routing.route_pointer``):
                    # np.int64 and np.bool_, as at the other call, not the literals 0 and True.
                    if not route(fused, slots[SL_REQUEST], np.int64(0), n, batch_new, batch_before, length,
                                 np.bool_(True), route_distinct, route_assignments, route_proxies):
                        return NON_FINITE
            clock[C_NEXT_EVENT] = next_event_s
            state[S_PHASE] = 4
            if config[K_SCHEDULE_OUTSIDE]:  # a plug-in's batching rule: the caller schedules (``Scheduler``)
                return NEED_SCHEDULE
            _schedule(req_i, req_f, slots, queue, state, config, batch_new, batch_before, batch_decoding, grow, now,
                      cache)
        if state[S_PHASE] == 4:
            # The batch is formed: take in prefilled requests' KV caches, route it.
            next_event_s = clock[C_NEXT_EVENT]
            if fused.enabled and state[S_ADMITTED]:
                admit_means(fused, state[S_RUNNING] - state[S_ADMITTED], state[S_RUNNING], slots[SL_REQUEST])
            if state[S_IN_COUNT] > 0:
                _start_transfers(req_i, req_f, incoming, receiving, state, config, timing, outbox_i, outbox_f, now,
                                 cache)
                for k in range(state[S_RECEIVING]):
                    next_event_s = min(next_event_s, req_f[receiving[k], RF_TRANSFER_END])
            count = state[S_BATCH_LEN]
            if count == 0:  # nothing fits: wait for the next input
                state[S_PHASE] = 0
                state[S_WAITING] = 1
                code = _wait(clock, state, timing, now, next_event_s)
                if code >= 0:
                    return code
                continue
            tokens = state[S_BATCH_TOKENS]
            decode = state[S_BATCH_DECODE]
            applied = config[K_APPLY_ALL] != 0 or decode == tokens
            state[S_APPLIED] = applied
            if config[K_STATISTICAL]:
                at = state[S_UNIFORM_AT]
                table = policy_table if applied else baseline_table
                drawn = _draw(table[0], table[1], table[2], table[3], table[4], table[5], samples[0 if applied else 1],
                              tokens, uniforms[at, 0], uniforms[at, 1], route_distinct[0], route_assignments[0],
                              route_proxies[:, 0], route_rank_distinct[0], route_rank_assignments[0])
                if not drawn:
                    return TOO_MANY_TOKENS
                state[S_UNIFORM_AT] = at + 1
                state[S_ROUTE_ROW] = 0
            elif (state[S_RUN_AT] < state[S_RUN_LENGTH] and state[S_RUN_EPOCH] == state[S_EPOCH]
                  and count == state[S_RUNNING] and decode == count):
                state[S_ROUTE_ROW] = state[S_RUN_AT]
                state[S_RUN_AT] += 1
            else:
                state[S_RUN_LENGTH] = 0
                state[S_RUN_AT] = 0
                state[S_ROUTE_ROW] = 0
                state[S_ROUTE_GROUPS] = 1
                if not fused.enabled:
                    state[S_PHASE] = 1
                    return ROUTE
                if not route(fused, slots[SL_REQUEST], state[S_BATCH_FIRST], count, batch_new, batch_before,
                             np.int64(1), applied, route_distinct, route_assignments, route_proxies):
                    return NON_FINITE
            state[S_PHASE] = 1
        count = state[S_BATCH_LEN]
        row = state[S_ROUTE_ROW]
        tokens = state[S_BATCH_TOKENS]
        if state[S_PHASE] == 1 and config[K_PRICE_OUTSIDE]:  # the caller prices it into clock[C_PRICE ...]
            state[S_PHASE] = 3
            return NEED_PRICE
        if state[S_PHASE] == 1:
            # Phase 1: the batch is routed (row S_ROUTE_ROW); price it.
            decode_rows = 0
            context_sum = 0
            num_chunks = 0
            for i in range(count):
                if batch_decoding[i]:
                    decode_rows += 1
                    context_sum += batch_before[i] + 1
                else:
                    chunks[num_chunks] = batch_new[i]
                    chunk_contexts[num_chunks] = batch_before[i]
                    num_chunks += 1
            price_iteration(pricing, decode_rows, context_sum, chunks, chunk_contexts, num_chunks, tokens, count,
                            route_distinct[row], route_assignments[row], route_rank_distinct[row],
                            route_rank_assignments[row], price)
            if residency.enabled:  # the fetches, in iteration order (a decode run's rows were routed ahead)
                active = fused.counts[row] if fused.enabled else residency.active[row]
                price[5] += fetch_and_price(residency, pricing, active, route_distinct[row], route_assignments[row])
            for p in range(6):
                clock[C_PRICE + p] = price[p]
            state[S_PHASE] = 3
        if state[S_PHASE] == 3:
            end = now + clock[C_PRICE + 5]
            if end > cutoff_s:
                clock[C_NOW] = cutoff_s
                clock[C_END] = cutoff_s
                state[S_CUT] = 1
                return DONE
            clock[C_PENDING_END] = end
            state[S_PHASE] = 2
        # Phase 2: complete and log it, once a prefill instance knows the transfers that end before its end.
        end = clock[C_PENDING_END]
        if role == ROLE_PREFILL and end >= timing[T_HORIZON]:  # a transfer ending by ``end`` may be unknown
            return HORIZON
        state[S_PHASE] = 0
        for p in range(6):
            price[p] = clock[C_PRICE + p]
        total = price[5]
        clock[C_NOW] = end
        clock[C_LAST_LATENCY] = total
        sampled = _complete(req_i, req_f, slots, state, config, timing, batch_new, end, fused.means,
                            fused.enabled and fused.persistent, outbox_i, outbox_f, cache)
        if role == ROLE_PREFILL and state[S_FREES] > 0:  # blocks whose transfer ended during the iteration
            _apply_frees(req_i, req_f, frees, state, end, cache)
        at = state[S_ROWS]
        log_f[LF_START, at] = now
        log_f[LF_LATENCY, at] = total
        log_f[LF_KV_USED, at] = 1.0 - state[S_FREE_BLOCKS] / config[K_BLOCKS]
        for k in range(6):
            log_f[LF_ATTENTION + k, at] = price[k]
        log_i[LI_PREFILL, at] = tokens - state[S_BATCH_DECODE]
        log_i[LI_DECODE, at] = state[S_BATCH_DECODE]
        log_i[LI_SEQUENCES, at] = count
        log_i[LI_SAMPLED, at] = sampled
        log_i[LI_APPLIED, at] = state[S_APPLIED]
        if residency.enabled:
            log_f[LF_OFFLOAD, at] = residency.exposed_s[0]
            log_i[LI_FETCHED, at] = residency.counters[1]
        for layer in range(layers):
            log_distinct[at, layer] = route_distinct[row, layer]
            for k in range(4):
                log_proxies[k, at, layer] = route_proxies[k, row, layer]
        state[S_ROWS] = at + 1


# ----- the batching steps, called from Python by ``lynxsim.engine.scheduler.Scheduler`` (a plug-in's rule) --------


@compiled(cache=True)
def schedule_step(req_i: np.ndarray, req_f: np.ndarray, slots: np.ndarray, queue: np.ndarray, state: np.ndarray,
                  config: np.ndarray, batch_new: np.ndarray, batch_before: np.ndarray, batch_decoding: np.ndarray,
                  now: float, cache: PrefixCache) -> None:
    """vLLM's rule (``_schedule``), the one the loop runs itself."""
    grow = np.empty(batch_new.size, dtype=np.int64)
    _schedule(req_i, req_f, slots, queue, state, config, batch_new, batch_before, batch_decoding, grow, now, cache)


@compiled(cache=True)
def schedule_running_step(req_i: np.ndarray, slots: np.ndarray, queue: np.ndarray, state: np.ndarray,
                          config: np.ndarray, batch_new: np.ndarray, budget: int,
                          cache: PrefixCache) -> tuple[int, int, bool]:
    """``_schedule_running``: tokens for the first running requests into ``batch_new`` from 0."""
    grow = np.empty(batch_new.size, dtype=np.int64)
    return _schedule_running(req_i, slots, queue, state, config, batch_new, grow, budget, cache)


@compiled(cache=True)
def admit_waiting_step(req_i: np.ndarray, req_f: np.ndarray, slots: np.ndarray, queue: np.ndarray,
                       state: np.ndarray, config: np.ndarray, batch_new: np.ndarray, at: int, budget: int,
                       now: float, whole_prompts: bool, cache: PrefixCache) -> tuple[int, int]:
    """``_admit_waiting``: admissions into ``batch_new`` from ``at``."""
    return _admit_waiting(req_i, req_f, slots, queue, state, config, batch_new, at, budget, now, whole_prompts,
                          cache)


@compiled(cache=True)
def set_batch(slots: np.ndarray, state: np.ndarray, batch_before: np.ndarray, batch_decoding: np.ndarray,
              first: int, count: int, num_tokens: int, admitted: int) -> None:
    """``_set_batch``."""
    _set_batch(slots, state, batch_before, batch_decoding, first, count, num_tokens, admitted)
