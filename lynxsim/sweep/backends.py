"""Where sweep points run: a local process pool (the default) or a Ray cluster.

Both run the same function (``simulate_point``) on the same tasks and hand back outcomes as points finish, so a
sweep's results do not depend on the backend; only the driver writes the results store. Ray is an optional
dependency (the ``[ray]`` extra) imported only when asked for; with ``address`` it joins an existing cluster
(every node needs lynxsim installed), without it it starts a local one with ``workers`` CPUs.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Literal

from lynxsim.errors import InputError
from lynxsim.sweep.execute import PointOutcome, PointTask, simulate_point

BackendName = Literal["local", "ray"]


def default_workers() -> int:
    """All the cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class LocalPool:
    """Spawned worker processes kept for several sweeps (a report's sections, one sweep each): a fresh worker
    imports lynxsim and loads numba's compiled kernels before its first point (about 2 s on a 2-core machine), which
    a pool per sweep paid again for every sweep. Workers are spawned (not forked) so that none inherits the driver's
    open files or threads. A pool whose worker died is replaced by a fresh one at the next point. Use as a context
    manager; the workers end with it."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._executor: ProcessPoolExecutor | None = None

    def executor(self) -> ProcessPoolExecutor:
        """The live pool, started on first use."""
        if self._executor is None:
            context = multiprocessing.get_context("spawn")
            self._executor = ProcessPoolExecutor(max_workers=self.workers, mp_context=context,
                                                 initializer=_leave_interrupts_to_the_driver)
        return self._executor

    def discard(self) -> None:
        """Shut the pool down (after a worker died: the executor refuses new work); the next use starts another."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def __enter__(self) -> LocalPool:
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        if kind is not None and issubclass(kind, KeyboardInterrupt) and self._executor is not None:
            # Ctrl-C: the points under way are abandoned (the store keeps the finished ones), not waited for
            for process in list(getattr(self._executor, "_processes", {}).values()):
                process.terminate()
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        self.discard()


def _leave_interrupts_to_the_driver() -> None:
    """A worker's start: Ctrl-C reaches every process of the terminal's group, and a worker that took it would print
    its own KeyboardInterrupt traceback; the driver alone handles it (``LocalPool.__exit__``, ``cli.main``)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def run_tasks(
    tasks: list[PointTask], backend: BackendName, workers: int, address: str | None = None,
    pool: LocalPool | None = None,
) -> Iterator[PointOutcome]:
    """Outcomes of ``tasks`` in the order they finish; ``pool``: the local backend's workers, kept by the caller
    across sweeps (else a pool of ``workers`` for these tasks alone)."""
    if not tasks:
        return iter(())
    if backend == "ray":
        return _ray_outcomes(tasks, workers, address)
    if pool is not None:
        return _local_outcomes(tasks, pool)
    return _own_pool_outcomes(tasks, workers)


def _own_pool_outcomes(tasks: list[PointTask], workers: int) -> Iterator[PointOutcome]:
    with LocalPool(workers) as pool:
        yield from _local_outcomes(tasks, pool)


def _local_outcomes(tasks: list[PointTask], pool: LocalPool) -> Iterator[PointOutcome]:
    """At most ``pool.workers`` points are in flight, so a killed sweep has little half-done work. A worker that
    dies (killed, out of memory) takes the points in flight with it: they are reported failed (``sweep
    --retry-failed`` runs them again) and the others go on in a fresh pool, as do all of them when a worker of a
    kept pool died between two sweeps."""
    queue = list(reversed(tasks))
    while queue:
        executor = pool.executor()
        running: dict[Future[PointOutcome], PointTask] = {}
        broken = False
        while (queue or running) and not broken:
            while queue and len(running) < pool.workers:
                try:
                    future = executor.submit(simulate_point, task := queue.pop())
                except BrokenProcessPool:  # a worker died while the kept pool was idle: the point goes to the next
                    queue.append(task)
                    broken = True
                    break
                running[future] = task
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                task = running.pop(future)
                try:
                    yield future.result()
                except BrokenProcessPool:
                    broken = True
                    yield PointOutcome(task.config_hash, 0.0, error="its worker process died")
        if broken:
            for task in running.values():
                yield PointOutcome(task.config_hash, 0.0, error="its worker process died")
            pool.discard()


def _ray_outcomes(tasks: list[PointTask], workers: int, address: str | None) -> Iterator[PointOutcome]:
    try:
        import ray
    except ImportError:
        raise InputError("--backend ray", "Ray is not installed: pip install 'lynxsim[ray]'") from None
    started_here = not ray.is_initialized()
    if started_here:
        options = {"address": address} if address else {"num_cpus": workers}
        ray.init(include_dashboard=False, log_to_driver=False, **options)
    remote = ray.remote(num_cpus=1, max_retries=0)(simulate_point)
    try:
        pending = {remote.remote(task): task for task in tasks}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                task = pending.pop(ref)
                try:
                    yield ray.get(ref)
                except ray.exceptions.RayError as exc:
                    yield PointOutcome(task.config_hash, 0.0, error=f"Ray task failed ({type(exc).__name__})")
    finally:
        if started_here:
            ray.shutdown()
