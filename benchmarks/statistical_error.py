"""How far the statistical routing mode is from exact routing: one experiment run both ways, side by side.

The statistical mode (``simulation.routing_mode: statistical``) draws each iteration's per-layer expert activity
from tables built once per policy instead of routing every token; this runs the same experiment and seed in both
modes and prints, per policy, TPOT and TTFT percentiles, mean distinct experts per layer and the quality proxies,
with the statistical run's difference from the exact one, and both wall times.

    python benchmarks/statistical_error.py benchmarks/scenarios/s1_mixtral_azure_conv_lynx.yaml
    python benchmarks/statistical_error.py benchmarks/scenarios/s3_deepseek_v3_ep8_lynx.yaml --duration-s 60

The statistical run's wall time includes building its tables unless an earlier run left them in the table cache
(``LYNXSIM_CACHE_DIR``); the table build is printed apart.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from lynxsim.config import load_experiment
from lynxsim.runner import prepare, simulate_policy

METRICS = (
    ("tpot_p50_ms", "TPOT p50 (ms)"),
    ("tpot_p99_ms", "TPOT p99 (ms)"),
    ("tpot_mean_ms", "TPOT mean (ms)"),
    ("ttft_p50_ms", "TTFT p50 (ms)"),
    ("ttft_p99_ms", "TTFT p99 (ms)"),
    ("mean_distinct_experts", "distinct experts per layer (decode)"),
    ("mean_distinct_experts_all", "distinct experts per layer (all)"),
    ("retained_mass", "retained top-k mass"),
    ("simulated_s_per_wall_s", "simulated s per wall s"),
)


def run(path: Path, mode: str, duration_s: float | None) -> tuple[dict[str, dict[str, float]], float]:
    """Every policy's summary in ``mode``, and the wall time of the whole run (setup included)."""
    overrides = [f"simulation.routing_mode={mode}"]
    if duration_s is not None:
        overrides.append(f"simulation.duration_s={duration_s}")
    started = time.perf_counter()
    setup = prepare(load_experiment(path, overrides))
    summaries = {label: simulate_policy(setup, label, entry, policy).summary for label, entry, policy in setup.policies}
    return summaries, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", type=Path)
    parser.add_argument("--duration-s", type=float, help="arrivals for this many simulated seconds only")
    parser.add_argument("--json", type=Path, help="write both runs' summaries here")
    args = parser.parse_args()
    exact, exact_wall_s = run(args.experiment, "exact", args.duration_s)
    statistical, statistical_wall_s = run(args.experiment, "statistical", args.duration_s)
    console = Console(width=160)
    for label in exact:
        a, b = exact[label], statistical[label]
        table = Table(title=f"{args.experiment.name} {label}: exact vs statistical routing"
                      + (f" ({args.duration_s:g} s of arrivals)" if args.duration_s else ""))
        for column in ("metric", "exact", "statistical", "difference"):
            table.add_column(column, justify="left" if column == "metric" else "right")
        for key, name in METRICS:
            x, y = a.get(key, float("nan")), b.get(key, float("nan"))
            table.add_row(name, f"{x:.4g}", f"{y:.4g}", f"{y / x - 1:+.2%}" if x else "-")
        console.print(table)
        console.print(f"table build {b.get('routing_table_build_s', 0.0):.1f} s (read from the cache: "
                      f"{bool(b.get('routing_table_cached'))}), baseline table "
                      f"{b.get('routing_baseline_table_build_s', 0.0):.1f} s")
    console.print(f"wall: exact {exact_wall_s:.1f} s, statistical {statistical_wall_s:.1f} s")
    if args.json is not None:
        payload: dict[str, Any] = {"experiment": str(args.experiment), "duration_s": args.duration_s,
                                   "exact": exact, "statistical": statistical,
                                   "exact_wall_s": exact_wall_s, "statistical_wall_s": statistical_wall_s}
        args.json.write_text(json.dumps(payload, indent=2, default=float) + "\n")


if __name__ == "__main__":
    main()
