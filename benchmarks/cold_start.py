"""A user's first run: the quickstart with an empty numba cache, timed whole, side by side with another checkout.

The first run on a machine compiles the engine's loop and its routing (numba caches them on disk; issue 17's target:
at most 15 s on this project's 2-core machine). Each cold run gets a fresh ``NUMBA_CACHE_DIR`` and output folder and
is timed from the process's start to its exit (``lynxsim run experiments/quickstart.yaml``, the README's first
command without its install), as a user waits for it; a warm run (the cache the last cold run filled) follows for
each tree. With ``--before DIR`` (another checkout, a ``git worktree``), its runs alternate with this tree's, so
that both see the same machine: that checkout's ``lynxsim`` is put first on ``PYTHONPATH``.

    python benchmarks/cold_start.py [--runs 3] [--before DIR] [--figures] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def timed_run(tree: Path, cache: Path, out: Path, figures: bool) -> float:
    """Wall seconds of one ``lynxsim run`` of ``tree``'s quickstart with numba's cache in ``cache``."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache), "PYTHONPATH": str(tree)}
    command = [sys.executable, "-m", "lynxsim", "run", "experiments/quickstart.yaml", "--out", str(out)]
    if not figures:
        command.append("--no-figures")
    started = time.perf_counter()
    done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True)
    wall_s = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{tree}: lynxsim run failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return wall_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="cold runs per tree")
    parser.add_argument("--before", type=Path, help="another checkout to time alternately with this one")
    parser.add_argument("--figures", action="store_true", help="write the figures too, as the quickstart does")
    parser.add_argument("--json", type=Path, help="write the wall times here")
    args = parser.parse_args()
    trees = {"this": REPO} | ({"before": args.before.resolve()} if args.before else {})
    cold: dict[str, list[float]] = {name: [] for name in trees}
    warm: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for run in range(args.runs):
            for name, tree in trees.items():
                cache, out = Path(scratch, f"{name}-cache-{run}"), Path(scratch, f"{name}-out-{run}")
                cold[name].append(timed_run(tree, cache, out, args.figures))
                if run == args.runs - 1:
                    warm[name] = timed_run(tree, cache, out, args.figures)
    for name, tree in trees.items():
        walls = ", ".join(f"{w:.1f}" for w in cold[name])
        print(f"{name} ({tree}): cold {walls} s; warm {warm[name]:.1f} s")
    if args.json:
        args.json.write_text(json.dumps({"figures": args.figures, "trees": {n: str(t) for n, t in trees.items()},
                                         "cold_s": cold, "warm_s": warm}, indent=2))


if __name__ == "__main__":
    main()
