"""One co-located instance alone on the engine, and the records every run gives.

``simulate`` gives one ``CompiledInstance`` every request up front and lets it run to the end (no horizon: no other
instance can send it anything). ``request_records`` and ``iteration_table`` turn instances' arrays into the
records (the tables ``lynxsim.metrics`` defines), for this and for ``orchestrator``'s deployments of several
instances. numba's on-disk caches of the loop are flushed when a source they carry changes.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from lynxsim.datatypes import RequestSpec, RequestTable
from lynxsim.engine.compiled import kernel as k
from lynxsim.engine.compiled.instance import CompiledInstance
from lynxsim.engine.compiled.prefix_cache import RunBlocks, block_identities
from lynxsim.engine.routing_step import RoutingStep
from lynxsim.engine.scheduler import Scheduler
from lynxsim.instance_cost import InstanceCostModel
from lynxsim.metrics import IterationLog, request_table


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
    ``lynxsim.cost_formulas``, the routing, expert offloading's fetches; the routing: the routing kernels): after an
    edit of one of those, numba would load the old code (measured: the loop kept an edited Lynx kernel's old code).
    So the caches of every compiled function of this package are flushed whenever the sources they carry change."""
    from numba.core.registry import CPUDispatcher

    from lynxsim import cost_formulas
    from lynxsim.engine.compiled import offloading, prefix_cache, routing
    from lynxsim.policies import column_kernels, selection_kernels
    from lynxsim.routing import synthetic_kernels

    loop_modules = (k, cost_formulas, routing, offloading, prefix_cache)

    # Dispatchers as Any: numba's type hints leave out their private on-disk cache (``_cache``) used here.
    def flush() -> None:
        for module in loop_modules:
            for function in vars(module).values():
                if isinstance(function, CPUDispatcher) and function.py_func.__module__ == module.__name__:
                    dispatcher: Any = function
                    dispatcher._cache.flush()

    sources = [Path(str(m.__file__)) for m in (*loop_modules, column_kernels, selection_kernels, synthetic_kernels)]
    if not isinstance(k.simulate, CPUDispatcher):  # LYNXSIM_NO_NUMBA: nothing compiled, nothing cached
        return
    simulate: Any = k.simulate
    marker = Path(simulate._cache.cache_path) / "simulate.sources.sha256"  # beside numba's cache of the loop
    flush_if_sources_changed(sources, marker, flush)


_drop_stale_loop_cache()

PROGRESS_EVERY_REQUESTS = 64

STATUS_NAMES = {
    k.ST_FINISHED: "finished",
    k.ST_REJECTED_KV: "rejected_exceeds_kv_cache",
    k.ST_REJECTED_BATCH: "rejected_exceeds_max_num_batched_tokens",
    k.ST_CUTOFF_RUNNING: "cutoff_running",
    k.ST_CUTOFF_WAITING: "cutoff_waiting",
}


class CompiledRun(NamedTuple):
    """What a simulation gives: the arrived requests' records (``metrics.request_table``), every
    instance's iteration log, the simulated end time."""

    requests: pd.DataFrame
    logs: list[IterationLog]
    end_s: float

    def iterations(self) -> pd.DataFrame:
        """Every instance's iterations as one table (``iteration_table``)."""
        return iteration_table([log.frame() for log in self.logs])


def iteration_table(frames: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """The iteration records of a deployment's instances (their ``IterationLog.frame``s, in instance order) as
    one table, in order of start time (then instance)."""
    frames = [frame for frame in frames if len(frame)]
    if not frames:
        return pd.DataFrame()
    if len(frames) == 1:
        return frames[0]
    frame = pd.concat(frames, ignore_index=True)
    return frame.sort_values(["start_s", "instance"], kind="mergesort", ignore_index=True)


def simulate(
    scheduler: Scheduler,
    cost_model: InstanceCostModel,
    step: RoutingStep,
    num_moe_layers: int,
    specs: Sequence[RequestSpec],
    cutoff_s: float | None,
    on_arrivals: Callable[[int], None] | None = None,
) -> CompiledRun:
    """Serve ``specs`` on one co-located instance with ``scheduler``'s limits (a fresh scheduler: its pool
    full, nothing queued), priced by ``cost_model`` and routed by ``step``, until every request is done or
    ``cutoff_s``."""
    table = RequestTable.of(specs)
    n = len(table)
    instance = CompiledInstance(scheduler, cost_model, step, num_moe_layers, n, cutoff_s=cutoff_s,
                                progress_every=PROGRESS_EVERY_REQUESTS if on_arrivals is not None else 0,
                                blocks=run_blocks(table, scheduler))
    instance.push(np.arange(n), table.request_id, table.arrival_s, table.arrival_s, table.prompt_tokens,
                  table.output_tokens, arrival_rejections(table, scheduler))
    if on_arrivals is not None:
        on_arrivals(0)
    instance.advance(math.inf, on_progress=on_arrivals)
    instance.finish()
    if on_arrivals is not None:
        on_arrivals(n)
    arrived = int(instance.state[k.S_ARRIVED])
    rows = np.arange(arrived)
    status = instance.req_i[rows, k.R_STATUS]
    on_instance = np.where((status == k.ST_REJECTED_KV) | (status == k.ST_REJECTED_BATCH), -1, 0)
    requests = request_records([instance], np.zeros(arrived, dtype=np.int64), rows, table[:arrived], on_instance,
                               on_instance, status)
    return CompiledRun(requests, [instance.log()], float(instance.clock[k.C_END]))


def run_blocks(table: RequestTable, scheduler: Scheduler) -> RunBlocks | None:
    """The block identities of ``table``'s requests in ``scheduler``'s KV-cache blocks, or None when no request is
    known to share a prefix (``RequestTable.prefix``; the runner leaves it out with ``serving.prefix_caching``
    off)."""
    if table.prefix is None:
        return None
    return block_identities(table.prefix, scheduler.pool.block_size_tokens)


def arrival_rejections(specs: Sequence[RequestSpec], entry: Scheduler, decode: Scheduler | None = None) -> np.ndarray:
    """Each request's status on arrival: ``ST_REJECTED_*`` where it can never be served (``Scheduler.rejection_codes``,
    the first reason that applies), else ``ST_NONE``. An instance caches a request's prompt and every output token
    but the last; with ``decode`` (disaggregated serving) the ``entry`` (prefill) instances hold only the prompt.
    The instances of a pool have the same limits, so a request fits all of a pool or none of it."""
    table = RequestTable.of(specs)
    prompts = table.prompt_tokens
    most_tokens = prompts + table.output_tokens - 1
    if decode is None:
        codes = entry.rejection_codes(most_tokens)
    else:
        codes = entry.rejection_codes(prompts)
        codes = np.where(codes > 0, codes, decode.rejection_codes(most_tokens))
    return np.where(codes > 0, codes - 1 + k.ST_REJECTED_KV, k.ST_NONE)


def request_records(
    instances: Sequence[CompiledInstance], homes: np.ndarray, rows: np.ndarray, specs: Sequence[RequestSpec],
    instance: np.ndarray, decode_instance: np.ndarray, status: np.ndarray,
    status_names: dict[int, str] | None = None,
) -> pd.DataFrame:
    """The records of ``specs``, whose counters and times are row ``rows[j]`` of instance ``homes[j]`` (where
    each ended up; -1: none, a request rejected on arrival), as ``metrics.request_table`` makes them;
    ``status`` codes named by ``STATUS_NAMES`` and ``status_names``."""
    table = RequestTable.of(specs)
    count = len(table)
    req_i = np.zeros((count, k.REQUEST_INTS), dtype=np.int64)
    req_f = np.full((count, k.REQUEST_FLOATS), np.nan)
    for home, source in enumerate(instances):
        here = homes == home
        req_i[here] = source.req_i[rows[here]]
        req_f[here] = source.req_f[rows[here]]
    names_by_code = {**STATUS_NAMES, **(status_names or {})}
    names = np.array([names_by_code.get(code, "") for code in range(max(names_by_code) + 1)], dtype=object)
    return request_table(
        request_id=table.request_id, arrival_s=table.arrival_s, prompt_tokens=table.prompt_tokens,
        output_tokens=table.output_tokens,
        generated_tokens=req_i[:, k.R_GENERATED], first_scheduled_s=req_f[:, k.RF_SCHEDULED],
        first_token_s=req_f[:, k.RF_FIRST_TOKEN], finish_s=req_f[:, k.RF_FINISH],
        preemptions=req_i[:, k.R_PREEMPTIONS], cached_tokens=req_i[:, k.R_HIT_TOKENS], instance=instance,
        decode_instance=decode_instance,
        transfer_start_s=req_f[:, k.RF_TRANSFER_START], transfer_end_s=req_f[:, k.RF_TRANSFER_END],
        status=list(names[status]),
    )
