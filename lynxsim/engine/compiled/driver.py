"""Running one co-located instance on the compiled engine, and answering what its loop asks for.

``simulate`` builds the arrays of ``kernel.simulate`` from the run's requests, scheduler limits, cost model and
routing step, re-enters the kernel until it is done, and gives back what the simpy engine gives: the arrived
requests' records (the table ``metrics.requests_frame`` makes of the simpy engine's ``Request`` objects, made
here from the kernel's arrays), the instance's ``IterationLog`` and the simulated end time. Between two entries
it routes exactly (``RoutingStep.exact_activities``, the simpy engine's own routing), adds a part to the log,
draws more uniforms, or reports progress.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from lynxsim.cost import CostModel
from lynxsim.datatypes import RequestSpec
from lynxsim.engine.compiled import kernel as k
from lynxsim.engine.compiled import pricing as compiled_pricing
from lynxsim.engine.compiled.routing import fused_routing
from lynxsim.engine.decode_run import MAX_RUN_ITERATIONS, run_token_ids
from lynxsim.engine.replica import RoutingStep
from lynxsim.engine.scheduler import Scheduler, batch_token_ids
from lynxsim.metrics import SCALAR_COLUMNS, IterationLog, request_table
from lynxsim.parallel import ParallelCostModel
from lynxsim.routing.statistical import ActivityTable, UniformStream


def flush_if_sources_changed(sources: Sequence[Path], marker: Path, flush: Callable[[], None]) -> bool:
    """Call ``flush`` when the digest of ``sources`` differs from the one recorded in ``marker`` (or none is),
    then record it; whether it flushed. A marker that cannot be written (a read-only install, where numba keeps
    nothing on disk either) is left as it is."""
    digest = hashlib.sha256(b"".join(path.read_bytes() for path in sources)).hexdigest()
    try:
        recorded = marker.read_text()
    except OSError:
        recorded = ""
    if recorded == digest:
        return False
    flush()
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(digest)
    except OSError:
        pass
    return True


def _drop_stale_loop_cache() -> None:
    """numba keys a cached function by its own source file only, but a compiled function carries the compiled code
    of the functions it calls in other files (the loop in ``kernel``: the pricing formulas of
    ``lynxsim.cost_formulas``, the routing; the routing: the routing kernels): after an edit of one of those, numba
    would load the old code (measured: the loop kept an edited Lynx kernel's old code). So the caches of every
    compiled function of this package are flushed whenever the sources they carry change."""
    from numba.core.registry import CPUDispatcher

    from lynxsim import cost_formulas
    from lynxsim.engine.compiled import routing
    from lynxsim.policies import column_kernels, selection_kernels
    from lynxsim.routing import synthetic_kernels

    loop_modules = (k, cost_formulas, routing)

    # Dispatchers as Any: numba's type hints leave out their private on-disk cache (``_cache``) used here.
    def flush() -> None:
        for module in loop_modules:
            for function in vars(module).values():
                if isinstance(function, CPUDispatcher) and function.py_func.__module__ == module.__name__:
                    dispatcher: Any = function
                    dispatcher._cache.flush()

    sources = [Path(str(m.__file__)) for m in (*loop_modules, column_kernels, selection_kernels, synthetic_kernels)]
    simulate: Any = k.simulate
    marker = Path(simulate._cache.cache_path) / "simulate.sources.sha256"  # beside numba's cache of the loop
    flush_if_sources_changed(sources, marker, flush)


_drop_stale_loop_cache()

INITIAL_LOG_ROWS = 1 << 14
UNIFORM_BLOCK = 1 << 16
"""Uniform pairs drawn at a time; the stream is the same whatever the block (``UniformStream``)."""
PROGRESS_EVERY_REQUESTS = 64

_STATUS_NAMES = {
    k.ST_FINISHED: "finished",
    k.ST_REJECTED_KV: "rejected_exceeds_kv_cache",
    k.ST_REJECTED_BATCH: "rejected_exceeds_max_num_batched_tokens",
    k.ST_CUTOFF_RUNNING: "cutoff_running",
    k.ST_CUTOFF_WAITING: "cutoff_waiting",
}


class CompiledRun(NamedTuple):
    """What the simpy ``Cluster`` of one instance gives after ``run``: the arrived requests' records
    (``metrics.requests_frame``'s table), the instance's iteration log, the simulated end time."""

    requests: pd.DataFrame
    log: IterationLog
    end_s: float


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


def simulate(
    scheduler: Scheduler,
    cost_model: CostModel | ParallelCostModel,
    step: RoutingStep,
    num_moe_layers: int,
    num_experts: int,
    specs: Sequence[RequestSpec],
    cutoff_s: float | None,
    on_arrivals: Callable[[int], None] | None = None,
) -> CompiledRun:
    """Serve ``specs`` on one co-located instance with ``scheduler``'s limits (a fresh scheduler: its pool
    full, nothing queued), priced by ``cost_model`` and routed by ``step``, until every request is done or
    ``cutoff_s``. ``ValueError`` for a cost model without compiled pricing (the runner asks
    ``lynxsim.engine.compiled.engine_for`` first)."""
    pool = scheduler.pool
    n = len(specs)
    max_seqs = scheduler.max_num_seqs
    pricing = compiled_pricing.of(cost_model, max_tokens=scheduler.max_num_batched_tokens)
    statistical = step.statistical
    config = np.zeros(k.CONFIG_SIZE, dtype=np.int64)
    config[k.K_BLOCKS] = pool.num_blocks
    config[k.K_BLOCK_TOKENS] = pool.block_size_tokens
    config[k.K_MAX_SEQS] = max_seqs
    config[k.K_MAX_TOKENS] = scheduler.max_num_batched_tokens
    config[k.K_CHUNKED] = scheduler.chunked_prefill
    config[k.K_APPLY_ALL] = step.apply_to == "all"
    config[k.K_STATISTICAL] = statistical is not None
    config[k.K_PROGRESS_EVERY] = PROGRESS_EVERY_REQUESTS if on_arrivals is not None else 0
    config[k.K_MAX_RUN] = MAX_RUN_ITERATIONS

    request_ids = np.array([spec.request_id for spec in specs], dtype=np.int64)
    req_i = np.zeros((n, k.REQUEST_INTS), dtype=np.int64)
    req_i[:, k.R_PROMPT] = [spec.prompt_tokens for spec in specs]
    req_i[:, k.R_OUTPUT] = [spec.output_tokens for spec in specs]
    req_i[:, k.R_TOKENS] = req_i[:, k.R_PROMPT]
    rejections = scheduler.rejection_codes(req_i[:, k.R_PROMPT] + req_i[:, k.R_OUTPUT] - 1)  # Request.max_tokens
    req_i[:, k.R_REJECT] = np.where(rejections > 0, rejections - 1 + k.ST_REJECTED_KV, k.ST_NONE)
    req_f = np.full((n, k.REQUEST_FLOATS), np.nan)
    req_f[:, k.RF_ARRIVAL] = [spec.arrival_s for spec in specs]

    queue = np.zeros(n + 1, dtype=np.int64)
    slots = np.zeros((k.SLOT_FIELDS, max_seqs), dtype=np.int64)
    state = np.zeros(k.STATE_SIZE, dtype=np.int64)
    state[k.S_FREE_BLOCKS] = pool.free_blocks
    clock = np.zeros(k.CLOCK_SIZE)
    batch_new = np.zeros(max(max_seqs, 1), dtype=np.int64)
    batch_before = np.zeros_like(batch_new)
    batch_decoding = np.zeros(batch_new.size, dtype=np.bool_)
    route_distinct = np.zeros((MAX_RUN_ITERATIONS, num_moe_layers), dtype=np.int64)
    route_assignments = np.zeros_like(route_distinct)
    route_proxies = np.zeros((4, MAX_RUN_ITERATIONS, num_moe_layers))
    ranks = pricing.ranks
    route_rank_distinct = np.zeros((MAX_RUN_ITERATIONS, num_moe_layers, max(ranks, 1)), dtype=np.int64)
    route_rank_assignments = np.zeros_like(route_rank_distinct)

    largest_batch = max(scheduler.max_num_batched_tokens, max_seqs)
    fused = fused_routing(step, cost_model, request_ids, max_slots=max_seqs, max_batch_tokens=largest_batch,
                          max_call_tokens=max(largest_batch, MAX_RUN_ITERATIONS * max_seqs))
    if statistical is not None:
        policy_table = _table_arrays(statistical.policy, ranks)
        baseline = statistical.baseline if statistical.baseline is not None else statistical.policy
        baseline_table = _table_arrays(baseline, ranks)
        samples = np.array([statistical.policy.samples, baseline.samples], dtype=np.int64)
        uniform_source = UniformStream(np.random.default_rng([step.seed, 0]))
        uniforms = np.array(uniform_source.peek(UNIFORM_BLOCK))
        uniform_source.advance(UNIFORM_BLOCK)
    else:
        empty = (np.ones(1, dtype=np.int64), np.zeros((0, num_moe_layers), dtype=np.int16),
                 np.zeros((0, num_moe_layers), dtype=np.int32), np.zeros((4, 0, num_moe_layers)),
                 np.zeros((0, num_moe_layers, max(ranks, 1)), dtype=np.int16),
                 np.zeros((0, num_moe_layers, max(ranks, 1)), dtype=np.int32))
        policy_table = baseline_table = empty
        samples = np.ones(2, dtype=np.int64)
        uniform_source = None
        uniforms = np.zeros((0, 2))
    state[k.S_UNIFORMS] = uniforms.shape[0]

    log_f, log_i, log_distinct, log_proxies = _log_part(INITIAL_LOG_ROWS, num_moe_layers)
    filled: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []  # full parts of the log, in order
    cutoff = math.inf if cutoff_s is None else float(cutoff_s)

    if on_arrivals is not None:
        on_arrivals(0)
    while True:
        code = k.simulate(
            config, cutoff, req_i, req_f, queue, slots, state, clock, batch_new, batch_before, batch_decoding,
            route_distinct, route_assignments, route_proxies, route_rank_distinct, route_rank_assignments, pricing,
            fused, policy_table, baseline_table, samples, uniforms, log_f, log_i, log_distinct, log_proxies,
        )
        if code == k.DONE:
            break
        if code == k.ROUTE or code == k.ROUTE_RUN:
            _route(code, step, cost_model, request_ids, slots, state, batch_new, batch_before, route_distinct,
                   route_assignments, route_proxies, route_rank_distinct, route_rank_assignments)
        elif code == k.NEED_LOG:  # keep the full part, go on in a fresh one twice as long (no copy)
            filled.append((log_f, log_i, log_distinct, log_proxies))
            log_f, log_i, log_distinct, log_proxies = _log_part(2 * log_f.shape[1], num_moe_layers)
            state[k.S_ROWS] = 0
        elif code == k.NEED_UNIFORMS:
            assert uniform_source is not None
            uniforms = np.array(uniform_source.peek(UNIFORM_BLOCK))
            uniform_source.advance(UNIFORM_BLOCK)
            state[k.S_UNIFORM_AT] = 0
            state[k.S_UNIFORMS] = uniforms.shape[0]
        elif code == k.PROGRESS:
            assert on_arrivals is not None
            on_arrivals(int(state[k.S_ARRIVED]))
        elif code == k.NON_FINITE:
            raise ValueError("logits must be finite (found NaN or infinity)")
        elif code == k.TOO_MANY_TOKENS:
            largest = statistical.policy.largest if statistical is not None else 0
            raise ValueError(f"the statistical table covers 1 to {largest} tokens per iteration, got "
                             f"{int(state[k.S_BATCH_TOKENS])}")
        else:
            raise RuntimeError(f"compiled engine returned unknown code {code}")
    if on_arrivals is not None:
        on_arrivals(n)
    arrived = int(state[k.S_ARRIVED])
    requests = _request_table(request_ids[:arrived], req_i[:arrived], req_f[:arrived])
    rows = int(state[k.S_ROWS])
    parts = [*filled, (log_f[:, :rows], log_i[:, :rows], log_distinct[:rows], log_proxies[:, :rows])]
    log = IterationLog.from_columns(
        num_moe_layers,
        _scalar_columns(np.concatenate([p[0] for p in parts], axis=1), np.concatenate([p[1] for p in parts], axis=1)),
        np.concatenate([p[2] for p in parts]),
        np.concatenate([p[3] for p in parts], axis=1),
    )
    return CompiledRun(requests, log, float(clock[k.C_END]))


def _route(
    code: int, step: RoutingStep, cost_model: CostModel | ParallelCostModel, request_ids: np.ndarray, slots: np.ndarray,
    state: np.ndarray, batch_new: np.ndarray, batch_before: np.ndarray, route_distinct: np.ndarray,
    route_assignments: np.ndarray, route_proxies: np.ndarray, route_rank_distinct: np.ndarray,
    route_rank_assignments: np.ndarray,
) -> None:
    """Exact routing of what the kernel asked for, into the routing rows: one batch (``ROUTE``: the batch
    buffers' requests, their new tokens after their cached ones), or a decode run (``ROUTE_RUN``: every running
    request's next ``groups`` tokens, one group per iteration)."""
    count = int(state[k.S_BATCH_LEN])
    if code == k.ROUTE:
        first = int(state[k.S_BATCH_FIRST])
        ids = request_ids[slots[k.SL_REQUEST, first : first + count]]
        token_requests, positions = batch_token_ids(ids, batch_new[:count], batch_before[:count])
        groups = 1
        applied = bool(state[k.S_APPLIED])
    else:
        groups = int(state[k.S_ROUTE_GROUPS])
        ids = request_ids[slots[k.SL_REQUEST, :count]]
        token_requests, positions = run_token_ids(ids, batch_before[:count], groups)
        applied = True
    draws = step.exact_activities(cost_model, token_requests, positions, groups, applied)
    for g, activity in enumerate(draws.activities):
        route_distinct[g] = activity.distinct
        route_assignments[g] = activity.assignments
        if activity.rank_distinct is not None and activity.rank_assignments is not None:
            route_rank_distinct[g] = activity.rank_distinct
            route_rank_assignments[g] = activity.rank_assignments
    route_proxies[:, :groups] = draws.proxies


def _log_part(rows: int, num_moe_layers: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Empty log columns for ``rows`` iterations: floats, integers, distinct experts, proxies."""
    return (np.zeros((9, rows)), np.zeros((5, rows), dtype=np.int64),
            np.zeros((rows, num_moe_layers), dtype=np.int16), np.zeros((4, rows, num_moe_layers), dtype=np.float32))


def _scalar_columns(log_f: np.ndarray, log_i: np.ndarray) -> dict[str, np.ndarray]:
    """The kernel's log rows as ``IterationLog``'s scalar columns, in its order and types."""
    values = {
        "start_s": log_f[k.LF_START], "latency_s": log_f[k.LF_LATENCY], "prefill_tokens": log_i[k.LI_PREFILL],
        "decode_tokens": log_i[k.LI_DECODE], "sequences": log_i[k.LI_SEQUENCES],
        "sampled_tokens": log_i[k.LI_SAMPLED], "policy_applied": log_i[k.LI_APPLIED],
        "kv_used_fraction": log_f[k.LF_KV_USED], "attention_s": log_f[k.LF_ATTENTION],
        "dense_s": log_f[k.LF_DENSE], "moe_s": log_f[k.LF_MOE], "communication_s": log_f[k.LF_COMMUNICATION],
        "overhead_s": log_f[k.LF_OVERHEAD], "total_s": log_f[k.LF_TOTAL],
    }
    return {name: values[name].astype(dtype) for name, dtype in SCALAR_COLUMNS.items()}


def _request_table(request_ids: np.ndarray, req_i: np.ndarray, req_f: np.ndarray) -> pd.DataFrame:
    """The arrived requests' records from the kernel's arrays (``metrics.request_table``): instance 0 for every
    request but those rejected on arrival (-1)."""
    status = req_i[:, k.R_STATUS]
    instance = np.where((status == k.ST_REJECTED_KV) | (status == k.ST_REJECTED_BATCH), -1, 0)
    never = np.full(request_ids.size, np.nan)
    names = np.array([_STATUS_NAMES.get(code, "") for code in range(max(_STATUS_NAMES) + 1)], dtype=object)
    return request_table(
        request_id=request_ids, arrival_s=req_f[:, k.RF_ARRIVAL], prompt_tokens=req_i[:, k.R_PROMPT],
        output_tokens=req_i[:, k.R_OUTPUT], generated_tokens=req_i[:, k.R_GENERATED],
        first_scheduled_s=req_f[:, k.RF_SCHEDULED], first_token_s=req_f[:, k.RF_FIRST_TOKEN],
        finish_s=req_f[:, k.RF_FINISH], preemptions=req_i[:, k.R_PREEMPTIONS], instance=instance,
        decode_instance=instance, transfer_start_s=never, transfer_end_s=never, status=list(names[status]),
    )
