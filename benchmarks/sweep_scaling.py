"""How long a sweep takes on each backend: the same sweep on the local pool with 1 and 2 workers and on Ray with 2.

Each configuration runs ``lynxsim sweep`` as a user would (a fresh process, a fresh results folder), one after
the other so they do not share cores; the script then checks that the three stores hold the same numbers and
prints wall times and their ratios to the 1-worker run. Not part of the test suite.

    python benchmarks/sweep_scaling.py [--experiment experiments/sweep_mixtral_lynx.yaml] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.table import Table

from lynxsim.sweep.store import ResultsStore

CONFIGURATIONS = (("local", 1), ("local", 2), ("ray", 2))
WALL_CLOCK_COLUMNS = "wall_s, simulated_s_per_wall_s"


def run_one(experiment: Path, backend: str, workers: int, out: Path) -> float:
    command = [
        sys.executable, "-m", "lynxsim", "sweep", str(experiment), "--out", str(out),
        "--backend", backend, "--workers", str(workers), "--records", "requests",
    ]
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def stored_numbers(out: Path) -> pd.DataFrame:
    return ResultsStore(out).query(f"SELECT * EXCLUDE ({WALL_CLOCK_COLUMNS}) FROM results ORDER BY point, policy_position")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", type=Path, default=Path("experiments/sweep_mixtral_lynx.yaml"))
    parser.add_argument("--json", type=Path, help="write the measurements here")
    args = parser.parse_args()
    console = Console()
    rows = []
    with tempfile.TemporaryDirectory(prefix="lynxsim-sweep-bench-") as tmp:
        stores = []
        for backend, workers in CONFIGURATIONS:
            out = Path(tmp) / f"{backend}{workers}"
            wall_s = run_one(args.experiment, backend, workers, out)
            points = int(ResultsStore(out).query("SELECT count(*) AS n FROM points")["n"].iloc[0])
            rows.append({"backend": backend, "workers": workers, "points": points, "wall_s": wall_s})
            stores.append(stored_numbers(out))
            console.print(f"{backend} x{workers}: {points} points in {wall_s:.1f} s")
        identical = all(frame.equals(stores[0]) for frame in stores[1:])
    base = rows[0]["wall_s"]
    table = Table(title=f"{args.experiment.name}: sweep wall time (fresh store each)")
    for column in ("backend", "workers", "points", "wall s", "s per point", "speed-up vs local x1"):
        table.add_column(column, justify="right")
    for row in rows:
        row["speedup"] = base / row["wall_s"]
        table.add_row(
            row["backend"], str(row["workers"]), str(row["points"]), f"{row['wall_s']:.1f}",
            f"{row['wall_s'] / row['points']:.2f}", f"{row['speedup']:.2f}",
        )
    console.print(table)
    console.print(f"stored numbers identical on every backend: {identical}")
    if args.json is not None:
        payload = {
            "experiment": str(args.experiment),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "load_average_at_end": os.getloadavg()[0],
            "identical_results": identical,
            "runs": rows,
        }
        args.json.write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
