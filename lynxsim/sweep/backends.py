"""Where sweep points run: a local process pool (the default) or a Ray cluster.

Both run the same function (``simulate_point``) on the same tasks and hand back outcomes as points finish, so a
sweep's results do not depend on the backend; only the driver writes the results store. Ray is an optional
dependency (the ``[ray]`` extra) imported only when asked for; with ``address`` it joins an existing cluster
(every node needs lynxsim installed), without it it starts a local one with ``workers`` CPUs.
"""

from __future__ import annotations

import multiprocessing
import os
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


def run_tasks(
    tasks: list[PointTask], backend: BackendName, workers: int, address: str | None = None
) -> Iterator[PointOutcome]:
    """Outcomes of ``tasks`` in the order they finish."""
    if not tasks:
        return iter(())
    if backend == "ray":
        return _ray_outcomes(tasks, workers, address)
    return _local_outcomes(tasks, workers)


def _local_outcomes(tasks: list[PointTask], workers: int) -> Iterator[PointOutcome]:
    """A process pool; workers are spawned (not forked) so that none inherits the driver's open files or
    threads, and at most ``workers`` points are in flight, so a killed sweep has little half-done work. A worker
    that dies (killed, out of memory) takes the points in flight with it: they are reported failed (``sweep
    --retry-failed`` runs them again) and the others go on in a fresh pool."""
    context = multiprocessing.get_context("spawn")
    queue = list(reversed(tasks))
    while queue:
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            running: dict[Future[PointOutcome], PointTask] = {}
            broken = False
            while (queue or running) and not broken:
                while queue and len(running) < workers:
                    task = queue.pop()
                    running[pool.submit(simulate_point, task)] = task
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    task = running.pop(future)
                    try:
                        yield future.result()
                    except BrokenProcessPool:
                        broken = True
                        yield PointOutcome(task.config_hash, 0.0, error="its worker process died")
            for task in running.values():
                yield PointOutcome(task.config_hash, 0.0, error="its worker process died")


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
