"""Timing harness: CUDA graphs, CUDA events, warm-up, median of repeats, weight-copy rotation. Imports torch.

Everything calibration and validation time goes through ``time_callable``:

* The work is a function ``run(i)`` of an invocation counter; calibration's units use copy ``i % copies`` of
  their weights (and KV caches), so consecutive invocations never find the previous one's bytes in L2
  (``lynxsim.calib.kernels.weights``: ``copies_to_defeat_l2``).
* On a GPU, ``run(0) .. run(n-1)`` is first executed eagerly (Triton compilation, cuBLAS heuristics and
  workspace, allocator warm-up), then captured into ONE CUDA graph, as vLLM captures its decode iterations
  and as validation captures a whole iteration; Python launch overhead is therefore absent from both sides.
* The graph is replayed ``warmup`` times untimed, then ``repeats`` times, each replay between two CUDA events
  (recorded on the capture stream, so each interval holds exactly one replay and its launch); the result is
  the median replay time divided by the ``n`` invocations it holds.
* On a CPU (smoke runs and tests) there are no graphs or events: the same loop is timed with
  ``time.perf_counter``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Timing:
    """One timed piece of work: median seconds per invocation, with the spread of the repeats."""

    median_s: float
    min_s: float
    max_s: float
    invocations: int
    repeats: int

    @property
    def spread(self) -> float:
        """(max - min) / median of the per-replay times."""
        return (self.max_s - self.min_s) / self.median_s if self.median_s > 0 else 0.0


def time_callable(
    run: Callable[[int], object],
    *,
    invocations: int,
    device: torch.device,
    repeats: int = 10,
    warmup: int = 2,
    use_graph: bool = True,
) -> Timing:
    """Median seconds of one invocation of ``run`` (see the module docstring)."""
    if invocations < 1 or repeats < 1:
        raise ValueError("invocations and repeats must be >= 1")
    if device.type != "cuda":
        for i in range(invocations):
            run(i)
        samples = []
        for _ in range(repeats):
            started = time.perf_counter()
            for i in range(invocations):
                run(i)
            samples.append((time.perf_counter() - started) / invocations)
        return Timing(statistics.median(samples), min(samples), max(samples), invocations, repeats)

    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for i in range(invocations):  # eager warm-up on the side stream, as graph capture wants
            run(i)
    torch.cuda.current_stream(device).wait_stream(stream)
    torch.cuda.synchronize(device)

    graph = None
    if use_graph:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # a private pool per graph (sharing one across deleted graphs asserts)
            for i in range(invocations):
                run(i)

    def once() -> None:
        if graph is not None:
            graph.replay()
        else:
            for i in range(invocations):
                run(i)

    for _ in range(warmup):
        once()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for start, end in zip(starts, ends, strict=True):
        start.record()
        once()
        end.record()
    torch.cuda.synchronize(device)
    samples = [start.elapsed_time(end) * 1e-3 / invocations for start, end in zip(starts, ends, strict=True)]
    return Timing(statistics.median(samples), min(samples), max(samples), invocations, repeats)


def invocations_for(estimate_s: float, copies: int, *, target_s: float = 1.5e-3, most: int = 64) -> int:
    """Invocations per captured graph: at least one pass over the ``copies``, and enough that the graph runs
    about ``target_s`` (a graph launch, a few microseconds, is then spread over many invocations), at most
    ``most`` (capture time grows with it)."""
    wanted = int(target_s / max(estimate_s, 1e-7)) + 1
    return max(copies, min(most, wanted), 1)


def environment(device: torch.device) -> dict[str, str]:
    """GPU name, torch and CUDA versions, as calibration metadata records them."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        cuda = torch.version.cuda or "unknown"
    else:
        name, cuda = f"CPU ({device})", "none"
    return {"gpu_name": name, "torch_version": torch.__version__, "cuda_version": cuda}
