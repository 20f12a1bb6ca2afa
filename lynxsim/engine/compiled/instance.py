"""One serving instance on the compiled engine: the arrays of ``kernel.simulate`` and the calls between them.

A ``CompiledInstance`` holds an instance's whole state (its requests, queue, running slots, KV blocks, clock,
iteration log) in numpy arrays that the kernel reads and writes. The caller gives it requests (``push``), lets
it run up to a horizon (``advance``: it starts no iteration at or after the horizon, where an input it cannot
know yet may reach it) and reads what it did (``events``). Between two kernel entries it answers what the loop
asks for: exact routing in Python (``RoutingStep.exact_activities``, a decode run's iterations together), a
longer log, more uniforms, room in the outbox, progress. ``driver`` runs one instance alone; ``orchestrator``
runs several, with request routers and KV-cache transfers between them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from lynxsim.datatypes import BatchShape, ExpertActivity
from lynxsim.engine.compiled import kernel as k
from lynxsim.engine.compiled import pricing as compiled_pricing
from lynxsim.engine.compiled.offloading import residency
from lynxsim.engine.compiled.prefix_cache import RunBlocks, make_prefix_cache
from lynxsim.engine.compiled.routing import fused_routing, route_function
from lynxsim.engine.decode_run import MAX_RUN_ITERATIONS, run_token_ids
from lynxsim.engine.deployment import KVTransfer
from lynxsim.engine.routing_step import RoutingStep
from lynxsim.engine.scheduler import Scheduler, batch_token_ids
from lynxsim.instance_cost import InstanceCostModel
from lynxsim.jit import compiled_for
from lynxsim.metrics import OFFLOAD_COLUMNS, SCALAR_COLUMNS, IterationLog
from lynxsim.routing.statistical import ActivityTable, UniformStream

INITIAL_LOG_ROWS = 1 << 14
UNIFORM_BLOCK = 1 << 16
"""Uniform pairs drawn at a time; the stream is the same whatever the block (``UniformStream``)."""
OUTBOX_ROWS_PER_SLOT = 8
"""The outbox holds this many events per running slot (an iteration writes at most two per slot)."""

ROLE_CODES = {"colocated": k.ROLE_COLOCATED, "prefill": k.ROLE_PREFILL, "decode": k.ROLE_DECODE}

TableArrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]
"""A statistical table as the kernel reads it (``_table_arrays``)."""


def _table_arrays(table: ActivityTable, ranks: int) -> TableArrays:
    """A statistical table as the kernel draws from it: sizes, then distinct, assignments (``[rows, layers]``),
    proxies (``[4, rows, layers]``; no rows for top-k) and the per-EP-rank distinct experts and assignments
    (``[rows, layers, ranks]``; no rows without expert parallelism), writable copies of one dtype each."""
    rows = table.sizes.size * table.samples
    layers = table.num_layers
    proxies = (np.zeros((4, 0, layers)) if table.proxies is None
               else np.array(table.proxies, dtype=np.float64).reshape(4, rows, layers))
    if table.rank_distinct is None or table.rank_assignments is None:
        rank_distinct = np.zeros((0, layers, max(ranks, 1)), dtype=np.int16)
        rank_assignments = np.zeros((0, layers, max(ranks, 1)), dtype=np.int32)
    else:
        rank_distinct = np.array(table.rank_distinct, dtype=np.int16).reshape(rows, layers, -1)
        rank_assignments = np.array(table.rank_assignments, dtype=np.int32).reshape(rows, layers, -1)
    return (np.array(table.sizes, dtype=np.int64), np.array(table.distinct, dtype=np.int16).reshape(rows, layers),
            np.array(table.assignments, dtype=np.int32).reshape(rows, layers), proxies, rank_distinct,
            rank_assignments)


def _log_part(rows: int, num_moe_layers: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Empty log columns for ``rows`` iterations: floats, integers, distinct experts, proxies."""
    return (np.zeros((k.LOG_FLOATS, rows)), np.zeros((k.LOG_INTS, rows), dtype=np.int64),
            np.zeros((rows, num_moe_layers), dtype=np.int16), np.zeros((4, rows, num_moe_layers), dtype=np.float32))


class CompiledInstance:
    """One instance's state for ``kernel.simulate``, with room for ``capacity`` requests.

    ``index`` and ``role`` are the instance's in its deployment; ``outstanding`` is what request routers read
    (requests given to it and not yet done there, kept by the orchestrator). ``transfer`` prices KV-cache
    transfers (disaggregated serving); ``record_events``
    turns the outbox on (the orchestrator reads it; one instance alone needs none); ``stop_on_finish`` stops it at
    every finish (``kernel.K_STOP_ON_FINISH``: closed-loop clients send their next request then). ``blocks``: the
    run's block identities, with which the instance caches prefixes (``prefix_cache``; None: it does not; a decode
    instance never looks prefixes up: its requests' KV caches come whole from a prefill instance)."""

    def __init__(
        self,
        scheduler: Scheduler,
        cost_model: InstanceCostModel,
        step: RoutingStep,
        num_moe_layers: int,
        capacity: int,
        *,
        index: int = 0,
        role: str = "colocated",
        cutoff_s: float | None = None,
        transfer: KVTransfer | None = None,
        record_events: bool = False,
        stop_on_finish: bool = False,
        progress_every: int = 0,
        blocks: RunBlocks | None = None,
    ) -> None:
        self.index = index
        self.role = role
        self.outstanding = 0
        self.done = False  # the last ``advance`` ended with ``DONE`` and nothing was given to it since
        self.scheduler = scheduler
        self.cost_model = cost_model
        self.step = step
        self.num_moe_layers = num_moe_layers
        pool = scheduler.pool
        max_seqs = scheduler.max_num_seqs
        pricing = compiled_pricing.of(cost_model, max_tokens=scheduler.max_num_batched_tokens)
        self.pricing = compiled_pricing.placeholder() if pricing is None else pricing
        statistical = step.statistical
        config = np.zeros(k.CONFIG_SIZE, dtype=np.int64)
        config[k.K_BLOCKS] = pool.num_blocks
        config[k.K_BLOCK_TOKENS] = pool.block_size_tokens
        config[k.K_MAX_SEQS] = max_seqs
        config[k.K_MAX_TOKENS] = scheduler.max_num_batched_tokens
        config[k.K_CHUNKED] = scheduler.chunked_prefill
        config[k.K_APPLY_ALL] = step.apply_to == "all"
        config[k.K_STATISTICAL] = statistical is not None
        config[k.K_PROGRESS_EVERY] = progress_every
        config[k.K_MAX_RUN] = MAX_RUN_ITERATIONS
        config[k.K_ROLE] = ROLE_CODES[role]
        record_events = record_events or role != "colocated"  # hand-offs and transfers always go out
        config[k.K_OUTBOX] = record_events
        config[k.K_STOP_ON_FINISH] = stop_on_finish
        config[k.K_PRICE_OUTSIDE] = pricing is None
        config[k.K_SCHEDULE_OUTSIDE] = not scheduler.rule_is_builtin
        self.config = config
        self.timing = np.zeros(k.TIMING_SIZE)
        self.timing[k.T_CUTOFF] = math.inf if cutoff_s is None else float(cutoff_s)
        self.timing[k.T_HORIZON] = math.inf
        if transfer is not None:
            self.timing[k.T_KV_BYTES_PER_TOKEN] = transfer.kv_bytes_per_token
            self.timing[k.T_BANDWIDTH] = transfer.bandwidth_bytes_per_s
            self.timing[k.T_LATENCY] = transfer.latency_s

        n = max(capacity, 1)
        self.request_ids = np.zeros(n, dtype=np.int64)
        self.positions = np.zeros(n, dtype=np.int64)  # each row's position in the run's request list
        self.req_i = np.zeros((n, k.REQUEST_INTS), dtype=np.int64)
        self.req_f = np.full((n, k.REQUEST_FLOATS), np.nan)
        self.queue = np.zeros(n + 1, dtype=np.int64)
        self.incoming = np.zeros(n + 1, dtype=np.int64)
        self.receiving = np.zeros(max(max_seqs, 1), dtype=np.int64)
        self.frees = np.zeros(n + 1, dtype=np.int64)
        outbox_rows = OUTBOX_ROWS_PER_SLOT * max(max_seqs, 1) + 8 if record_events else 1
        self.outbox_i = np.zeros((outbox_rows, 2), dtype=np.int64)
        self.outbox_f = np.zeros(outbox_rows)
        self.slots = np.zeros((k.SLOT_FIELDS, max_seqs), dtype=np.int64)
        self.state = np.zeros(k.STATE_SIZE, dtype=np.int64)
        self.state[k.S_FREE_BLOCKS] = pool.num_blocks
        self.blocks = blocks if role != "decode" else None
        self.prefix = make_prefix_cache(self.blocks, pool.num_blocks)
        self.clock = np.zeros(k.CLOCK_SIZE)
        self.batch_new = np.zeros(max(max_seqs, 1), dtype=np.int64)
        self.batch_before = np.zeros_like(self.batch_new)
        self.batch_decoding = np.zeros(self.batch_new.size, dtype=np.bool_)
        self.route_distinct = np.zeros((MAX_RUN_ITERATIONS, num_moe_layers), dtype=np.int64)
        self.route_assignments = np.zeros_like(self.route_distinct)
        self.route_proxies = np.zeros((4, MAX_RUN_ITERATIONS, num_moe_layers))
        ranks = self.pricing.ranks
        if pricing is None and statistical is not None and statistical.policy.rank_distinct is not None:
            ranks = int(np.asarray(statistical.policy.rank_distinct).shape[-1])  # a plug-in's per-rank draws
        self.route_rank_distinct = np.zeros((MAX_RUN_ITERATIONS, num_moe_layers, max(ranks, 1)), dtype=np.int64)
        self.route_rank_assignments = np.zeros_like(self.route_rank_distinct)

        largest_batch = max(scheduler.max_num_batched_tokens, max_seqs)
        self.fused = fused_routing(step, cost_model, self.request_ids, max_slots=max_seqs,
                                   max_batch_tokens=largest_batch,
                                   max_call_tokens=max(largest_batch, MAX_RUN_ITERATIONS * max_seqs))
        self.route_function = route_function(self.fused)
        self._simulate: Callable[..., int] | None = None  # kernel.simulate as compiled for this instance's arrays
        self.uniform_source: UniformStream | None = None
        if statistical is not None:
            self.policy_table = _table_arrays(statistical.policy, ranks)
            baseline = statistical.baseline if statistical.baseline is not None else statistical.policy
            self.baseline_table = _table_arrays(baseline, ranks)
            self.samples = np.array([statistical.policy.samples, baseline.samples], dtype=np.int64)
            self.uniform_source = UniformStream(np.random.default_rng([step.seed, index]))
            self.uniforms = self._next_uniforms()
        else:
            layers = num_moe_layers
            empty = (np.ones(1, dtype=np.int64), np.zeros((0, layers), dtype=np.int16),
                     np.zeros((0, layers), dtype=np.int32), np.zeros((4, 0, layers)),
                     np.zeros((0, layers, max(ranks, 1)), dtype=np.int16),
                     np.zeros((0, layers, max(ranks, 1)), dtype=np.int32))
            self.policy_table = self.baseline_table = empty
            self.samples = np.ones(2, dtype=np.int64)
            self.uniforms = np.zeros((0, 2))
        self.state[k.S_UNIFORMS] = self.uniforms.shape[0]
        self.log_part = _log_part(INITIAL_LOG_ROWS, num_moe_layers)
        self.filled: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []  # full log parts, in order
        self.routed: list[ExpertActivity] = []  # what the last exact routing call gave, by routing row
        self.residency = residency(step.offloading, num_moe_layers, step.routing.num_experts)
        scheduler.bind(self)

    # ----- input -----

    @property
    def pushed(self) -> int:
        return int(self.state[k.S_PUSHED])

    @property
    def now_s(self) -> float:
        """The instance's clock: every input before it has been taken into account."""
        return float(self.clock[k.C_NOW])

    @property
    def busy(self) -> bool:
        """Whether it holds work (running, queued, awaiting blocks or a KV cache): it may start an iteration
        without a new arrival."""
        state = self.state
        return bool(state[k.S_RUNNING] or state[k.S_WQ_COUNT] or state[k.S_IN_COUNT] or state[k.S_RECEIVING])

    @property
    def paused(self) -> bool:
        """Whether it holds an iteration priced and not completed (a prefill instance waiting to know the
        transfers that end before the iteration does)."""
        return bool(self.state[k.S_PHASE] == 2)

    @property
    def frontier_s(self) -> float:
        """How far its own decisions reach: the end of its paused iteration, else its clock."""
        return float(self.clock[k.C_PENDING_END]) if self.paused else self.now_s

    def can_move(self, horizon_s: float) -> bool:
        """Whether ``advance(horizon_s)`` would do anything."""
        return not self.done and self.frontier_s < horizon_s

    @property
    def earliest_start_s(self) -> float:
        """The earliest time it can start its next iteration with what it has been given: now when it holds
        work, else when the next request given to it arrives (inf: none)."""
        if self.busy:
            return self.frontier_s
        arrived = int(self.state[k.S_ARRIVED])
        if arrived < self.pushed:
            return max(self.now_s, float(self.req_f[arrived, k.RF_INBOX]))
        return math.inf

    @property
    def cut(self) -> bool:
        return bool(self.state[k.S_CUT])

    def push(self, position: ArrayLike, request_id: ArrayLike, arrival_s: ArrayLike, inbox_s: ArrayLike,
             prompt_tokens: ArrayLike, output_tokens: ArrayLike, reject: ArrayLike = k.ST_NONE) -> int:
        """Give the instance a request (``position`` in the run's list) that reaches it at ``inbox_s`` (no earlier
        than any request given before), or several at once (arrays of one length, in that order; an instance alone
        takes a whole run's this way); the first one's row. ``reject``: the ``ST_REJECTED_*`` status it gets on
        arrival."""
        r = self.pushed
        rows = slice(r, r + np.size(position))
        if self.blocks is not None:
            positions = np.asarray(position, dtype=np.int64)
            self.req_i[rows, k.R_KEY_AT] = self.blocks.starts[positions]
            self.req_i[rows, k.R_KEYED] = self.blocks.counts[positions]
        self.request_ids[rows] = request_id
        self.positions[rows] = position
        self.req_i[rows, k.R_PROMPT] = prompt_tokens
        self.req_i[rows, k.R_OUTPUT] = output_tokens
        self.req_i[rows, k.R_TOKENS] = prompt_tokens
        self.req_i[rows, k.R_REJECT] = reject
        self.req_f[rows, k.RF_ARRIVAL] = arrival_s
        self.req_f[rows, k.RF_INBOX] = inbox_s
        self.state[k.S_PUSHED] = rows.stop
        self.done = False
        return r

    def push_handed_off(self, source: CompiledInstance, row: int, inbox_s: float) -> int:
        """Give a decode instance the request that ``source`` (a prefill instance) handed off from its ``row``:
        its counters and times so far come along; its KV blocks here are allocated when it leaves the incoming
        queue."""
        r = self.push(int(source.positions[row]), int(source.request_ids[row]), float(source.req_f[row, k.RF_ARRIVAL]),
                      inbox_s, 0, 0)
        self.req_i[r] = source.req_i[row]
        self.req_i[r, k.R_BLOCKS] = 0
        self.req_i[r, [k.R_KEYED, k.R_CACHED]] = 0
        self.req_i[r, k.R_STATUS] = k.ST_NONE
        self.req_f[r, [k.RF_SCHEDULED, k.RF_FIRST_TOKEN]] = source.req_f[row, [k.RF_SCHEDULED, k.RF_FIRST_TOKEN]]
        return r

    def free_at(self, row: int, end_s: float) -> None:
        """Prefill role: the KV cache of handed-off ``row`` has moved by ``end_s``; its blocks are free then."""
        self.req_f[row, k.RF_TRANSFER_END] = end_s
        self.frees[self.state[k.S_FREES]] = row
        self.state[k.S_FREES] += 1
        self.done = False

    # ----- running -----

    def advance(self, horizon_s: float, on_events: Callable[[np.ndarray, np.ndarray], None] | None = None,
                on_progress: Callable[[int], None] | None = None) -> int:
        """Run until the instance is done (``kernel.DONE``) or would start an iteration at or after
        ``horizon_s`` (``kernel.HORIZON``; lower on a prefill instance that hands a request off). ``on_events``
        takes the outbox's kinds and rows, times whenever it fills and at the end; ``on_progress`` the requests
        arrived so far. Raises ``ValueError`` for routing that fails (non-finite logits, a batch beyond a
        statistical table)."""
        self.timing[k.T_HORIZON] = horizon_s
        state = self.state
        while True:
            code = self._enter()
            if code == k.DONE or code == k.HORIZON:
                break
            if code == k.ROUTE or code == k.ROUTE_RUN:
                self._route(code)
            elif code == k.NEED_LOG:  # keep the full part, go on in a fresh one twice as long (no copy)
                self.filled.append(self.log_part)
                self.log_part = _log_part(2 * self.log_part[0].shape[1], self.num_moe_layers)
                state[k.S_ROWS] = 0
            elif code == k.NEED_UNIFORMS:
                self.uniforms = self._next_uniforms()
                state[k.S_UNIFORM_AT] = 0
                state[k.S_UNIFORMS] = self.uniforms.shape[0]
            elif code == k.NEED_SCHEDULE:
                self._schedule()
            elif code == k.NEED_PRICE:
                self._price()
            elif code == k.NEED_OUTBOX:
                self._drain(on_events)
            elif code == k.PROGRESS:
                if on_progress is not None:
                    on_progress(int(state[k.S_ARRIVED]))
            elif code == k.NON_FINITE:
                raise ValueError("logits must be finite (found NaN or infinity)")
            elif code == k.TOO_MANY_TOKENS:
                statistical = self.step.statistical
                largest = statistical.policy.largest if statistical is not None else 0
                raise ValueError(f"the statistical table covers 1 to {largest} tokens per iteration, got "
                                 f"{int(state[k.S_BATCH_TOKENS])}")
            else:
                raise RuntimeError(f"compiled engine returned unknown code {code}")
        self._drain(on_events)
        return code

    def _next_uniforms(self) -> np.ndarray:
        """The statistical mode's next ``UNIFORM_BLOCK`` uniform pairs, as a writable array."""
        assert self.uniform_source is not None
        uniforms = np.array(self.uniform_source.peek(UNIFORM_BLOCK))
        self.uniform_source.advance(UNIFORM_BLOCK)
        return uniforms

    def _enter(self) -> int:
        log_f, log_i, log_distinct, log_proxies = self.log_part
        args: tuple[Any, ...] = (
            self.config, self.timing, self.req_i, self.req_f, self.queue, self.incoming, self.receiving, self.frees,
            self.outbox_i, self.outbox_f, self.slots, self.state, self.clock, self.batch_new, self.batch_before,
            self.batch_decoding, self.route_distinct, self.route_assignments, self.route_proxies,
            self.route_rank_distinct, self.route_rank_assignments, self.pricing, self.prefix, self.fused,
            self.route_function,
            self.policy_table, self.baseline_table, self.samples, self.uniforms, log_f, log_i, log_distinct,
            log_proxies, self.residency,
        )
        if self._simulate is None:  # every later call passes arguments of the same types
            self._simulate = compiled_for(k.simulate, args)
        code: int = self._simulate(*args)
        return code

    def _drain(self, on_events: Callable[[np.ndarray, np.ndarray], None] | None) -> None:
        count = int(self.state[k.S_OUTBOX])
        if count and on_events is not None:
            on_events(self.outbox_i[:count].copy(), self.outbox_f[:count].copy())
        self.state[k.S_OUTBOX] = 0

    def _route(self, code: int) -> None:
        """Exact routing of what the kernel asked for, into the routing rows: one batch (``ROUTE``: the batch
        buffers' requests, their new tokens after their cached ones), or a decode run (``ROUTE_RUN``: every
        running request's next ``groups`` tokens, one group per iteration)."""
        state, slots = self.state, self.slots
        count = int(state[k.S_BATCH_LEN])
        if code == k.ROUTE:
            first = int(state[k.S_BATCH_FIRST])
            ids = self.request_ids[slots[k.SL_REQUEST, first : first + count]]
            token_requests, positions = batch_token_ids(ids, self.batch_new[:count], self.batch_before[:count])
            groups = 1
            applied = bool(state[k.S_APPLIED])
        else:
            groups = int(state[k.S_ROUTE_GROUPS])
            ids = self.request_ids[slots[k.SL_REQUEST, :count]]
            token_requests, positions = run_token_ids(ids, self.batch_before[:count], groups)
            applied = True
        active = self.residency.active if self.residency.enabled else None
        draws = self.step.exact_activities(self.cost_model, token_requests, positions, groups, applied, active)
        self.routed = draws.activities
        for g, activity in enumerate(draws.activities):
            self.route_distinct[g] = activity.distinct
            self.route_assignments[g] = activity.assignments
            if activity.rank_distinct is not None and activity.rank_assignments is not None and not self.priced_outside:
                self.route_rank_distinct[g] = activity.rank_distinct
                self.route_rank_assignments[g] = activity.rank_assignments
        self.route_proxies[:, :groups] = draws.proxies

    def _schedule(self) -> None:
        """The next batch by the scheduler's own rule (a plug-in's), through its steps on this instance."""
        state = self.state
        state[k.S_BATCH_LEN] = -1  # until make_batch sets it
        self.scheduler.start_batch()
        batch = self.scheduler.schedule(self.now_s)
        if (batch.first, len(batch), batch.num_tokens) != (state[k.S_BATCH_FIRST], state[k.S_BATCH_LEN],
                                                           state[k.S_BATCH_TOKENS]):
            raise ValueError(f"{type(self.scheduler).__name__}.schedule must return the batch its make_batch made")

    @property
    def priced_outside(self) -> bool:
        return bool(self.config[k.K_PRICE_OUTSIDE])

    def _price(self) -> None:
        """The routed batch in the buffers priced by the cost model's Python code (a plug-in's), into the
        loop's price entries."""
        state = self.state
        count = int(state[k.S_BATCH_LEN])
        row = int(state[k.S_ROUTE_ROW])
        decoding = self.batch_decoding[:count]
        prefill = ~decoding
        new, before = self.batch_new[:count], self.batch_before[:count]
        shape = BatchShape.trusted(new[prefill], before[prefill], before[decoding] + 1)
        if self.step.statistical is None:
            activity = self.routed[row]
        else:
            ranked = self.policy_table[4].shape[0] > 0
            activity = ExpertActivity(
                self.route_distinct[row].copy(), self.route_assignments[row].copy(),
                self.route_rank_distinct[row].copy() if ranked else None,
                self.route_rank_assignments[row].copy() if ranked else None,
            )
        latency = self.cost_model.iteration_activity(shape, activity)
        self.clock[k.C_PRICE : k.C_PRICE + 6] = (latency.attention_s, latency.dense_s, latency.moe_s,
                                                 latency.communication_s, latency.overhead_s, latency.total_s)

    # ----- the end -----

    def finish(self) -> None:
        """Cut-off statuses for what is still here (``kernel.finish_cut_off``); the scheduler lets go of the
        instance (``Scheduler.bind``), which the run's records are then read from."""
        k.finish_cut_off(self.req_i, self.req_f, self.queue, self.incoming, self.receiving, self.slots, self.state,
                         self.config, self.timing)
        self.scheduler.bind(None)

    def awaiting_transfer(self) -> np.ndarray:
        """Decode role: the rows still waiting for KV blocks here."""
        state = self.state
        head, count = int(state[k.S_IN_HEAD]), int(state[k.S_IN_COUNT])
        return self.incoming[(head + np.arange(count)) % self.incoming.size]

    def transferring(self) -> np.ndarray:
        """Decode role: the rows whose KV cache is still in transfer to here."""
        return self.receiving[: int(self.state[k.S_RECEIVING])].copy()

    def log(self) -> IterationLog:
        """Every iteration this instance ran, in order."""
        rows = int(self.state[k.S_ROWS])
        log_f, log_i, log_distinct, log_proxies = self.log_part
        parts = [*self.filled, (log_f[:, :rows], log_i[:, :rows], log_distinct[:rows], log_proxies[:, :rows])]
        log_f = np.concatenate([p[0] for p in parts], axis=1)
        log_i = np.concatenate([p[1] for p in parts], axis=1)
        offload = None
        if self.residency.enabled:
            values = {"offload_s": log_f[k.LF_OFFLOAD], "experts_fetched": log_i[k.LI_FETCHED]}
            offload = {name: values[name].astype(dtype) for name, dtype in OFFLOAD_COLUMNS.items()}
        return IterationLog.from_columns(
            self.num_moe_layers,
            _scalar_columns(log_f, log_i),
            np.concatenate([p[2] for p in parts]),
            np.concatenate([p[3] for p in parts], axis=1),
            instance=self.index,
            role=self.role,
            offload=offload,
        )


def _scalar_columns(log_f: np.ndarray, log_i: np.ndarray) -> dict[str, np.ndarray]:
    """The kernel's log rows as ``IterationLog``'s scalar columns, in its order and types."""
    values: dict[str, Any] = {
        "start_s": log_f[k.LF_START], "latency_s": log_f[k.LF_LATENCY], "prefill_tokens": log_i[k.LI_PREFILL],
        "decode_tokens": log_i[k.LI_DECODE], "sequences": log_i[k.LI_SEQUENCES],
        "sampled_tokens": log_i[k.LI_SAMPLED], "policy_applied": log_i[k.LI_APPLIED],
        "kv_used_fraction": log_f[k.LF_KV_USED], "attention_s": log_f[k.LF_ATTENTION],
        "dense_s": log_f[k.LF_DENSE], "moe_s": log_f[k.LF_MOE], "communication_s": log_f[k.LF_COMMUNICATION],
        "overhead_s": log_f[k.LF_OVERHEAD], "total_s": log_f[k.LF_TOTAL],
    }
    return {name: values[name].astype(dtype) for name, dtype in SCALAR_COLUMNS.items()}
