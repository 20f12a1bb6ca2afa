"""How fast lynxsim simulates: fixed scenarios (issue 6), each timed in a fresh process, against the issue's targets.

For each scenario (a YAML experiment in ``benchmarks/scenarios/``) it prints simulated seconds, wall seconds,
their ratio (x real time), iterations per wall second and peak RSS, and checks the targets: S1 >= 500x real time
within 1.5 GB; S3 >= 100x; S4 (20 policies) below 20x its single-policy reference S4ref (run along with it); the S1
trace on 4 replicas behind least-outstanding routing (S1r) and disaggregated on one prefill and one decode instance
(S1d) >= 500x each (issue 17).

Each scenario runs in its own child process so that the peak RSS (``ru_maxrss`` from ``os.wait4``) is that
scenario's alone and no cache or allocator state leaks from one scenario to the next. The child times
``runner.run_experiment`` itself (resolving the config into requests and policies, every policy's simulation and
records, the parquet files written to a temporary folder; no figures); interpreter start, imports and config
loading are reported apart as "start s". numpy's thread pools are limited to one thread: the targets are for one
core. "CPU share" is the run's CPU time over its wall time: well below 100%, other processes took the core and the
wall-clock figures understate the speed; "x per CPU s" (simulated seconds per CPU second of the run) is then the
better estimate of the speed on an idle core. Simulated seconds are, per policy, the simulated clock at its last
event, summed over the policies of a scenario; iterations are the rows of each policy's iteration records.

``--warm`` times each scenario a second time in the same child ("warm x"): numba's kernels are then loaded (the
first call of a compiled function in a process loads it from numba's cache, ~0.25 s for the compiled engine) and
the data files are in the page cache, which is what every further run of a sweep worker costs; the targets are
checked on the first (cold) run. ``--profile`` runs the children under cProfile (which slows Python-heavy code, so its wall times are not the
speed figures) and splits the time into engine / routing / policy / cost model / records / other by the module of
each function; ``--limit-sim-s N`` stops arrivals after N simulated seconds, for quick looks (the run then drains
the requests already there, and every figure is partial).

    python benchmarks/speed.py [--scenarios S1 S3] [--profile] [--warm] [--limit-sim-s N] [--json PATH]
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import json
import math
import os
import platform
import pstats
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

SCENARIO_DIR = Path(__file__).resolve().parent / "scenarios"
BUCKETS = ("engine", "routing", "policy", "cost model", "records", "other")
LIBRARY = "library"  # numpy, pandas, Python built-ins: own time only; their attributed time is their callers'
ONE_THREAD = {name: "1" for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}


@dataclass(frozen=True)
class Scenario:
    """A scenario file and the issue's target for it; a target left None is not set for that scenario."""

    key: str
    file: str
    min_x_real_time: float | None = None
    max_rss_mb: float | None = None
    max_ratio_to: tuple[str, float] | None = None  # (reference scenario, the most this one's wall may be of its wall)


SCENARIOS = {
    s.key: s
    for s in (
        Scenario("S1", "s1_mixtral_azure_conv_lynx.yaml", min_x_real_time=500, max_rss_mb=1500),
        Scenario("S2", "s2_mixtral_azure_conv_topk.yaml"),
        Scenario("S3", "s3_deepseek_v3_ep8_lynx.yaml", min_x_real_time=100),
        Scenario("S4", "s4_qwen3_20_policies.yaml", max_ratio_to=("S4ref", 20)),
        Scenario("S4ref", "s4_qwen3_single_policy.yaml"),
        Scenario("S1s", "s1_mixtral_azure_conv_lynx_statistical.yaml", min_x_real_time=5000),
        Scenario("S3s", "s3_deepseek_v3_ep8_lynx_statistical.yaml"),
        Scenario("S1r", "s1r_mixtral_azure_conv_lynx_4_replicas.yaml", min_x_real_time=500),
        Scenario("S1d", "s1d_mixtral_azure_conv_lynx_disaggregated.yaml", min_x_real_time=500),
    )
}


# ----- the child: one scenario, timed and optionally profiled ----------------------------------------------------


def run_child(path: Path, limit_sim_s: float | None, profile: bool, warm: bool, result_path: Path) -> None:
    """Run one scenario in this process and write its figures to ``result_path`` (JSON); with ``warm``, run it
    a second time in the same process and time that too."""
    import lynxsim
    from lynxsim.config import load_experiment
    from lynxsim.jit import kernels
    from lynxsim.runner import PolicyRun, run_experiment

    try:  # an import (numba's, ~0.25 s): "start s", as the other imports; absent from checkouts before it
        kernels("lynxsim.engine.compiled.driver")
    except ModuleNotFoundError:
        pass

    config = load_experiment(path)
    if limit_sim_s is not None:
        duration_s = min(limit_sim_s, config.simulation.duration_s or math.inf)
        config = load_experiment(path, [f"simulation.duration_s={duration_s}"])
    policies: list[dict[str, Any]] = []

    def record(run: PolicyRun) -> None:
        simulated_s = run.summary["simulated_s"]  # the clock at the simulation's last event
        policies.append({"label": run.label, "simulated_s": simulated_s, "iterations": len(run.iterations),
                         "wall_s": run.wall_s})

    profiler = cProfile.Profile() if profile else None
    with tempfile.TemporaryDirectory(prefix="lynxsim-speed-") as out_dir:
        started, cpu_started = time.perf_counter(), time.process_time()
        if profiler is not None:
            profiler.enable()
        result = run_experiment(config, Path(out_dir), on_policy_done=record)
        if profiler is not None:
            profiler.disable()
        run_wall_s, run_cpu_s = time.perf_counter() - started, time.process_time() - cpu_started
    warm_figures: dict[str, float] = {}
    if warm:
        with tempfile.TemporaryDirectory(prefix="lynxsim-speed-") as out_dir:
            started, cpu_started = time.perf_counter(), time.process_time()
            run_experiment(config, Path(out_dir))
            warm_figures = {"warm_wall_s": time.perf_counter() - started,
                            "warm_cpu_s": time.process_time() - cpu_started}
    payload = {
        **warm_figures,
        "lynxsim": str(Path(lynxsim.__file__).parent),
        "requests": len(result.setup.requests),
        "cost_model": result.setup.cost_model.source,
        "run_wall_s": run_wall_s,
        "run_cpu_s": run_cpu_s,
        "simulate_wall_s": sum(p["wall_s"] for p in policies),
        "policies": policies,
    }
    if profiler is not None:
        payload["profile"] = profile_summary(pstats.Stats(profiler))
    result_path.write_text(json.dumps(payload))


# ----- profile attribution -----------------------------------------------------------------------------------------

Func = tuple[str, int, str]  # pstats' key: (file, line, function name)


def module_of(filename: str) -> str:
    """Dotted module of a source file, from its last ``lynxsim/`` or ``site-packages/`` part ('' for built-ins)."""
    for anchor in ("/lynxsim/", "/site-packages/"):
        if anchor in filename:
            rest = filename.rsplit(anchor, 1)[1].removesuffix(".py").replace("/", ".")
            return ("lynxsim." + rest) if anchor == "/lynxsim/" else rest
    return ""


def own_bucket(func: Func) -> str | None:
    """The bucket a function's own time belongs to by its module; None for library code (numpy, pandas, Python
    built-ins), whose time goes to whoever called it: numpy called by a policy is the policy's cost."""
    module = module_of(func[0])
    if module.startswith(("lynxsim.engine", "simpy")):
        return "engine"
    if module.startswith("lynxsim.routing"):
        return "routing"
    if module.startswith("lynxsim.policies"):
        return "policy"
    if module in ("lynxsim.cost", "lynxsim.parallel", "lynxsim.hardware"):
        return "cost model"
    writes_records = module == "lynxsim.runner" and func[2].startswith(("write_", "_atomic_", "_jsonable"))
    if module == "lynxsim.metrics" or writes_records or module.startswith(("pyarrow", "pandas.io.parquet")):
        return "records"
    if module.startswith("lynxsim"):
        return "other"
    return None


def profile_summary(stats: pstats.Stats, top: int = 15) -> dict[str, Any]:
    """Per bucket, its own time (functions of its modules) and its attributed time (own time plus library time
    spent on its behalf, split over callers in proportion to the time each call edge accounts for; the buckets'
    attributed times add up to the profile's total); and the ``top`` functions by own time."""
    table: dict[Func, Any] = stats.stats  # type: ignore[attr-defined]
    shares: dict[Func, dict[str, float]] = {}

    def share_of(func: Func, visiting: set[Func]) -> dict[str, float]:
        bucket = own_bucket(func)
        if bucket is not None:
            return {bucket: 1.0}
        if func in shares:
            return shares[func]
        callers = {c: edge for c, edge in table[func][4].items() if c not in visiting}
        weights = {c: edge[2] or edge[3] or edge[1] for c, edge in callers.items()}
        total = sum(weights.values())
        mix = {"other": 1.0} if total <= 0 else {}
        for caller, weight in weights.items():
            if weight > 0:
                for name, part in share_of(caller, visiting | {func}).items():
                    mix[name] = mix.get(name, 0.0) + part * weight / total
        shares[func] = mix
        return mix

    own = dict.fromkeys((*BUCKETS, LIBRARY), 0.0)
    attributed = dict.fromkeys(BUCKETS, 0.0)
    for func, (_, _, own_s, _, _) in table.items():
        own[own_bucket(func) or LIBRARY] += own_s
        for name, part in share_of(func, set()).items():
            attributed[name] += own_s * part
    ranked = sorted(table.items(), key=lambda item: item[1][2], reverse=True)[:top]
    functions = [
        {"function": describe(f), "bucket": own_bucket(f) or LIBRARY, "calls": nc, "own_s": tt, "cumulative_s": ct}
        for f, (_, nc, tt, ct, _) in ranked
    ]
    return {"total_s": sum(own.values()), "own_s": own, "attributed_s": attributed, "top_functions": functions}


def describe(func: Func) -> str:
    filename, line, name = func
    module = module_of(filename)
    return f"{module}:{line}({name})" if module else name


# ----- the parent: scenarios in child processes, the tables ------------------------------------------------------


def run_scenario(scenario: Scenario, limit_sim_s: float | None, profile: bool, warm: bool) -> dict[str, Any]:
    """Run ``scenario`` in a fresh interpreter; its figures plus the child's peak RSS and whole wall time."""
    with tempfile.TemporaryDirectory(prefix="lynxsim-speed-result-") as folder:
        result_path = Path(folder) / "result.json"
        command = [sys.executable, __file__, "--child", str(SCENARIO_DIR / scenario.file), "--result", str(result_path)]
        if limit_sim_s is not None:
            command += ["--limit-sim-s", str(limit_sim_s)]
        if profile:
            command.append("--profile")
        if warm:
            command.append("--warm")
        started = time.perf_counter()
        child = subprocess.Popen(command, env={**os.environ, **ONE_THREAD})
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        process_wall_s = time.perf_counter() - started
        if child.returncode != 0:
            raise SystemExit(f"speed.py: scenario {scenario.key} failed (exit code {child.returncode})")
        result = json.loads(result_path.read_text())
    simulated_s = sum(p["simulated_s"] for p in result["policies"])
    iterations = sum(p["iterations"] for p in result["policies"])
    wall_s = result["run_wall_s"]
    return {
        "scenario": scenario.key,
        "file": f"benchmarks/scenarios/{scenario.file}",
        **result,
        "simulated_s": simulated_s,
        "iterations": iterations,
        "x_real_time": simulated_s / wall_s,
        "x_real_time_per_cpu_s": simulated_s / result["run_cpu_s"],
        "iterations_per_wall_s": iterations / wall_s,
        "peak_rss_mb": usage.ru_maxrss * 1024 / 1e6,  # Linux reports KiB
        "cpu_share": result["run_cpu_s"] / wall_s,
        "start_s": process_wall_s - wall_s - result.get("warm_wall_s", 0.0),
        **({"x_real_time_warm": simulated_s / result["warm_wall_s"]} if "warm_wall_s" in result else {}),
    }


def check_targets(results: dict[str, dict[str, Any]]) -> None:
    """Add each result's ``target`` (text) and ``met`` (bool, or None without a target)."""
    for key, result in results.items():
        scenario = SCENARIOS[key]
        parts: list[str] = []
        met: list[bool] = []
        if scenario.min_x_real_time is not None:
            parts.append(f">= {scenario.min_x_real_time:g}x")
            met.append(result["x_real_time"] >= scenario.min_x_real_time)
        if scenario.max_rss_mb is not None:
            parts.append(f"<= {scenario.max_rss_mb:g} MB")
            met.append(result["peak_rss_mb"] <= scenario.max_rss_mb)
        if scenario.max_ratio_to is not None:
            reference, most = scenario.max_ratio_to
            ratio = result["run_wall_s"] / results[reference]["run_wall_s"]
            result["wall_ratio_to_reference"] = ratio
            parts.append(f"< {most:g}x {reference}: {ratio:.1f}x")
            met.append(ratio < most)
        result["target"] = "; ".join(parts) or "-"
        result["met"] = all(met) if met else None


def results_table(results: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=title)
    warm = any("x_real_time_warm" in r for r in results)
    columns = ("scenario", "policies", "requests", "simulated s", "wall s", "x real time", "iterations",
               "iter / wall s", "peak RSS MB", "CPU share", "x per CPU s", "start s", *(("warm x",) if warm else ()),
               "target", "met?")
    for column in columns:
        table.add_column(column, justify="left" if column in ("scenario", "target") else "right")
    for r in results:
        met = "-" if r["met"] is None else ("yes" if r["met"] else "NO")
        table.add_row(
            r["scenario"], str(len(r["policies"])), f"{r['requests']:,}", f"{r['simulated_s']:,.0f}",
            f"{r['run_wall_s']:,.1f}", ratio(r["x_real_time"]), f"{r['iterations']:,}",
            f"{r['iterations_per_wall_s']:,.0f}", f"{r['peak_rss_mb']:,.0f}", f"{r['cpu_share']:.0%}",
            ratio(r["x_real_time_per_cpu_s"]), f"{r['start_s']:.1f}",
            *((ratio(r["x_real_time_warm"]) if "x_real_time_warm" in r else "-",) if warm else ()), r["target"], met,
        )
    return table


def ratio(x: float) -> str:
    """Three significant digits, so that 0.106x and 612x both read well."""
    return f"{x:,.3g}" if x < 1000 else f"{x:,.0f}"


def profile_tables(result: dict[str, Any]) -> tuple[Table, Table]:
    profile = result["profile"]
    total = profile["total_s"]
    buckets = Table(title=f"{result['scenario']}: where the profiled time goes ({total:,.1f} s under cProfile)")
    for column in ("bucket", "own s", "own %", "attributed s", "attributed %"):
        buckets.add_column(column, justify="left" if column == "bucket" else "right")
    for name in (*BUCKETS, LIBRARY):
        own = profile["own_s"][name]
        attributed = profile["attributed_s"].get(name)
        shown = ("-", "-") if attributed is None else (f"{attributed:,.1f}", f"{100 * attributed / total:.1f}")
        buckets.add_row(name, f"{own:,.1f}", f"{100 * own / total:.1f}", *shown)
    functions = Table(title=f"{result['scenario']}: top functions by own time")
    for column in ("function", "bucket", "calls", "own s", "cumulative s"):
        functions.add_column(column, justify="left" if column in ("function", "bucket") else "right")
    for f in profile["top_functions"]:
        counts = (f"{f['calls']:,}", f"{f['own_s']:,.2f}", f"{f['cumulative_s']:,.2f}")
        functions.add_row(f["function"], f["bucket"], *counts)
    return buckets, functions


def environment(lynxsim_dir: str) -> dict[str, Any]:
    """What the figures depend on: the machine, its load, versions, and the commit of the lynxsim the children
    imported (``git describe --dirty`` there; empty outside a git checkout, e.g. a ``git archive`` on PYTHONPATH)."""
    import numpy

    names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
             if line.startswith("model name")]
    cpu = names[0] if names else platform.processor()
    describe = ["git", "describe", "--always", "--dirty"]
    commit = subprocess.run(describe, capture_output=True, text=True, cwd=lynxsim_dir, check=False).stdout.strip()
    return {
        "finished_at": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "lynxsim": lynxsim_dir,
        "commit": commit,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", nargs="+", choices=list(SCENARIOS), default=["S1", "S2", "S3", "S4"])
    parser.add_argument("--profile", action="store_true", help="run under cProfile and split the time by module")
    parser.add_argument("--limit-sim-s", type=float, help="stop arrivals after this many simulated seconds (partial)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--warm", action="store_true",
                        help="also time a second run in the same process (\"warm x\"): what each further run of a "
                             "sweep worker costs, without the process's one-time loading of numba's compiled kernels")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        run_child(args.child, args.limit_sim_s, args.profile, args.warm, args.result)
        return

    keys = list(dict.fromkeys(args.scenarios))
    for key in list(keys):
        if SCENARIOS[key].max_ratio_to is not None and SCENARIOS[key].max_ratio_to[0] not in keys:
            keys.insert(keys.index(key), SCENARIOS[key].max_ratio_to[0])
    console = Console(width=None if sys.stdout.isatty() else 200)
    load_at_start = os.getloadavg()[0]
    results: dict[str, dict[str, Any]] = {}
    for key in keys:
        console.print(f"[bold]{key}[/bold]: {SCENARIOS[key].file} ...")
        results[key] = run_scenario(SCENARIOS[key], args.limit_sim_s, args.profile, args.warm)
    check_targets(results)
    meta = {**environment(next(iter(results.values()))["lynxsim"]), "load_average_1min_at_start": load_at_start}

    notes = []
    if args.limit_sim_s is not None:
        notes.append(f"PARTIAL: arrivals stopped after {args.limit_sim_s:g} simulated s; not the full scenarios")
    if args.profile:
        notes.append("PROFILED: wall times include cProfile's overhead; they are not the speed figures")
    title = "lynxsim simulation speed (one thread)" + "".join(f"\n{note}" for note in notes)
    console.print(results_table(list(results.values()), title))
    console.print(f"lynxsim {meta['lynxsim']} ({meta['commit'] or 'not a git checkout'}); {meta['cpu']}; "
                  f"load average {load_at_start:.2f} at the start")
    for note in notes:
        console.print(f"[bold red]{note}[/bold red]")
    for result in results.values():
        if "profile" in result:
            for table in profile_tables(result):
                console.print(table)
    if args.json is not None:
        payload = {"argv": sys.argv[1:], "limit_sim_s": args.limit_sim_s, "profile": args.profile, "environment": meta,
                   "results": list(results.values())}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
