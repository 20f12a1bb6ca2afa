"""Per-iteration routing work, numpy path against numba kernels, side by side in one run.

One decode iteration of the engine's routing: synthetic router logits for ``T`` tokens (one per request, the
same requests every iteration, one position further each time), the policy's choice, tokens per expert and the
quality proxies. The numpy path is what the engine ran before the kernels: ``SyntheticRouting.numpy_logits``,
``policy.select``, ``expert_token_counts`` and ``quality_proxies`` (``QualityProxies.of_topk`` for top-k), with
today's tabulated normals (the Box-Muller normals before them made it slower still). The numba path is
``SyntheticRouting.logits`` and ``route_counts``, once per iteration and with ``--groups`` iterations per call
(the engine's decode runs). Both paths must give the same counts, which the script checks.

Shapes: Mixtral-8x7B (32 MoE layers, 8 experts, top-2; Lynx alpha 0.7, beta 1, its published constants) and
DeepSeek-V3 (58 MoE layers, 256 experts, top-8; Lynx alpha 1, beta 2, as benchmarks/scenarios/s3), 32 tokens.
Timings are CPU time of the benchmark's thread (``time.thread_time``: time spent waiting for a core shared with
other processes is not counted), the median over rounds that alternate the paths.
The first-call column is the first kernel call of the process: numba's compile time when its cache is cold
(run with ``NUMBA_CACHE_DIR=$(mktemp -d)``), loading the cached machine code otherwise.

    python benchmarks/routing_kernels.py [--tokens 32] [--groups 4] [--rounds 15] [--iterations 20]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
from rich.console import Console
from rich.table import Table

from lynxsim.policies import Lynx, Policy, TopK
from lynxsim.policies.activity import expert_token_counts
from lynxsim.policies.kernels import route_counts
from lynxsim.policies.proxies import QualityProxies, quality_proxies
from lynxsim.routing import SyntheticRouting


@dataclass(frozen=True)
class Shape:
    name: str
    layers: int
    experts: int
    top_k: int
    lynx: Lynx


SHAPES = (
    Shape("Mixtral-8x7B", 32, 8, 2, Lynx(alpha=0.7, beta=1)),
    Shape("DeepSeek-V3", 58, 256, 8, Lynx(alpha=1.0, beta=2)),
)


def numpy_iteration(
    source: SyntheticRouting, policy: Policy, top_k: int, requests: np.ndarray, position: int
) -> np.ndarray:
    """One iteration as the engine ran it before the kernels; returns the counts."""
    logits = source.numpy_logits(requests, np.full(requests.size, position))
    selection = policy.select(logits, top_k)
    counts = expert_token_counts(selection.expert_ids, logits.shape[-1])
    if isinstance(policy, TopK):
        QualityProxies.of_topk(logits.shape[0])
    else:
        quality_proxies(logits, selection, top_k)
    return counts


def numba_iterations(
    source: SyntheticRouting, policy: Policy, top_k: int, requests: np.ndarray, groups: int, call: int
) -> np.ndarray:
    """``groups`` consecutive iterations (those of call number ``call``) in one routing call, as the engine's
    decode runs make it; returns the counts ``[groups, layers, experts]``."""
    positions = groups * call + np.arange(groups)
    logits = source.logits(np.tile(requests, groups), np.repeat(positions, requests.size))
    layers, tokens, experts = logits.shape
    counts, _ = route_counts(logits.reshape(layers, groups, tokens // groups, experts), policy, top_k)
    return counts


def logits_only(logits: Callable[[np.ndarray, np.ndarray], np.ndarray], requests: np.ndarray, position: int) -> object:
    """The routing source's part of one iteration."""
    return logits(requests, np.full(requests.size, position))


def cpu_ms(step: Callable[[int], object], iterations: int, start: int) -> float:
    """CPU time of ``iterations`` calls of ``step(position)`` per call, in ms."""
    begin = time.thread_time()
    for i in range(iterations):
        step(start + i)
    return (time.thread_time() - begin) / iterations * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32, help="decode batch size (default 32)")
    parser.add_argument("--groups", type=int, default=4, help="iterations per routing call in the grouped column")
    parser.add_argument("--rounds", type=int, default=15, help="alternating timing rounds (default 15)")
    parser.add_argument("--iterations", type=int, default=20, help="iterations per path and round (default 20)")
    args = parser.parse_args()

    table = Table(title=f"Routing work per decode iteration, {args.tokens} tokens (median of {args.rounds} rounds)")
    for column in ("model", "policy", "numpy ms", "numba ms", "ratio", f"numba x{args.groups} ms", "ratio",
                   "logits numpy/numba", "first call s"):
        table.add_column(column, justify="left" if column in ("model", "policy") else "right")
    requests = np.arange(args.tokens, dtype=np.int64) * 7919  # arbitrary request ids
    groups = args.groups
    for shape in SHAPES:
        for policy in (TopK(), shape.lynx):
            old_source = SyntheticRouting(shape.layers, shape.experts, seed=1)
            new_source = SyntheticRouting(shape.layers, shape.experts, seed=1)
            k = shape.top_k
            begin = time.perf_counter()
            first = numba_iterations(new_source, policy, k, requests, 1, 100)[0]
            first_call_s = time.perf_counter() - begin
            if not np.array_equal(first, numpy_iteration(old_source, policy, k, requests, 100)):
                raise SystemExit(f"{shape.name} {policy.name}: the numba and numpy paths disagree")
            steps: dict[str, Callable[[int], object]] = {
                "old": partial(numpy_iteration, old_source, policy, k, requests),
                "new": partial(numba_iterations, new_source, policy, k, requests, 1),
                "grouped": partial(numba_iterations, new_source, policy, k, requests, groups),
                "old_logits": partial(logits_only, old_source.numpy_logits, requests),
                "new_logits": partial(logits_only, new_source.logits, requests),
            }
            steps["grouped"](0)  # compiles the grouped shapes
            rounds: dict[str, list[float]] = {key: [] for key in steps}
            for r in range(args.rounds):
                start = 1000 + r * args.iterations
                for key, step in steps.items():
                    per_call = cpu_ms(step, args.iterations, start)
                    rounds[key].append(per_call / groups if key == "grouped" else per_call)
            ms = {key: float(np.median(values)) for key, values in rounds.items()}
            table.add_row(
                shape.name, policy.name, f"{ms['old']:.3f}", f"{ms['new']:.3f}", f"{ms['old'] / ms['new']:.1f}x",
                f"{ms['grouped']:.3f}", f"{ms['old'] / ms['grouped']:.1f}x",
                f"{ms['old_logits'] / ms['new_logits']:.1f}x", f"{first_call_s:.2f}",
            )
    Console(width=132).print(table)


if __name__ == "__main__":
    main()
