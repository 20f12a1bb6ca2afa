"""The ``lynxsim`` command line.

Bad input of any kind ends in one line on stderr naming the key path or file and line, and exit code 2; results
computed before the problem was found stay on disk.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import numpy as np
import pandas as pd
from rich.console import Console
from rich.progress import TaskID
from rich.table import Table

from lynxsim import __version__
from lynxsim.calib.commands import add_calibrate_parser, add_validate_parser
from lynxsim.capacity import CapacityProbe, find_capacity
from lynxsim.config import load_experiment
from lynxsim.errors import InputError, exit_code
from lynxsim.hardware import hardware_names, load_hardware
from lynxsim.models import catalog_summary
from lynxsim.plots import load_run, read_run, run_context, write_run_figures
from lynxsim.plugins import REGISTRIES
from lynxsim.preflight import MEMORY_SHARE, estimate, wall_time_s
from lynxsim.quality.commands import add_quality_parser
from lynxsim.records import PARTIAL_SUFFIX
from lynxsim.report.commands import add_report_parser
from lynxsim.routing import RoutingTrace, import_flame
from lynxsim.routing.compare import compare_figures, compare_routing
from lynxsim.routing.fit import fit_routing, load_profile, save_profile
from lynxsim.routing.loading import open_trace
from lynxsim.routing.profiles import profile_path
from lynxsim.routing.statistics import is_statistics_file
from lynxsim.routing.trace_format import DEFAULT_FILL, FILL_STRATEGIES
from lynxsim.runner import PolicyRun, prepare, run_experiment
from lynxsim.summary_columns import format_cell, summary_cells
from lynxsim.sweep.commands import add_sweep_parsers, plot_sweep
from lynxsim.sweep.points import load_sweep
from lynxsim.sweep.progress import run_progress
from lynxsim.sweep.store import DATABASE_NAME
from lynxsim.timeline import MAX_EVENTS, TraceWritten, write_traces


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    # Piped output gets room for the wide tables instead of rich's 80-column fallback.
    console = Console(width=None if sys.stdout.isatty() else 200)
    try:
        return exit_code(lambda: args.handler(args, console))
    except KeyboardInterrupt:
        print("lynxsim: interrupted: nothing unfinished was written as finished (a run's finished policies are in "
              f"its '<dir>{PARTIAL_SUFFIX}' folder, a sweep's finished points in its store)", file=sys.stderr)
        return 130


def console_main() -> int:
    """The ``lynxsim`` command and ``python -m lynxsim``: ``main``, then the interpreter's exit without collecting
    what the command built. ``gc.freeze`` leaves those objects out of the collection the interpreter runs as it
    exits, in which numba's compiled functions and their LLVM objects are freed one by one: 0.5 s of a 2-s warm
    quickstart, 1 s after a cold one (measured); the process's exit returns their memory anyway. Files are closed
    and ``atexit`` handlers run as before. Not in ``main``, which tests call many times in one process."""
    code = main()
    gc.freeze()
    return code


class _OneLineParser(argparse.ArgumentParser):
    """argparse, its usage errors in the one-line form of every other bad input (``lynxsim: error: ...``, exit
    code 2) instead of a usage block followed by the message."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"lynxsim: error: {self.prog}: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = _OneLineParser(prog="lynxsim", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"lynxsim {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="simulate every policy of an experiment and compare them")
    _experiment_arguments(run)
    run.add_argument("--out", type=Path, help="run directory (default: output.dir of the experiment)")
    run.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    run.add_argument("--strict", action="store_true",
                     help="exit with code 1 when the summary warns (rejected, unfinished or no measured requests)")
    run.add_argument("--trace", action="store_true",
                     help="also write each policy's timeline as a Chrome trace (RUN_DIR/trace/, as lynxsim trace)")
    run.set_defaults(handler=_run)

    capacity = commands.add_parser(
        "capacity", help="per policy, the highest arrival rate that meets the experiment's SLO (bisection over rate)"
    )
    _experiment_arguments(capacity)
    capacity.add_argument("--tolerance", type=float, default=0.02, help="relative width of the final rate bracket")
    capacity.add_argument("--out", type=Path, help="folder for capacity.csv (default: output.dir of the experiment)")
    capacity.set_defaults(handler=_capacity)

    check = commands.add_parser("check", help="validate an experiment and show what it resolves to")
    _experiment_arguments(check)
    check.set_defaults(handler=_check)

    models = commands.add_parser("models", help="list the model catalog with derived sizes")
    models.set_defaults(handler=_models)

    hardware = commands.add_parser("hardware", help="list the hardware profiles")
    hardware.set_defaults(handler=_hardware)

    plugins = commands.add_parser(
        "plugins", help="list the policies, schedulers, routers, cost models and routing sources an experiment can "
        "name: the built-ins and those installed packages add")
    plugins.set_defaults(handler=_plugins)

    routing = commands.add_parser("routing", help="recorded routing traces: import, fit the generator, compare")
    routing_commands = routing.add_subparsers(dest="routing_command", required=True)
    fit = routing_commands.add_parser(
        "fit", help="fit the synthetic generator to a trace or to a routing statistics file; write a routing profile")
    _trace_arguments(fit)
    fit.add_argument("--out", type=Path, required=True, help="routing profile YAML to write")
    fit.add_argument("--check", type=Path,
                     help="statistics file: another one, held out of the fit, to measure the fitted generator against")
    fit.set_defaults(handler=_routing_fit)
    evidence = routing_commands.add_parser(
        "evidence", help="write routing_evidence.md: each model's routing profile against its statistics")
    evidence.add_argument("--out", type=Path, default=Path("docs"), help="folder for the page and its figures")
    evidence.set_defaults(handler=_routing_evidence)
    compare = routing_commands.add_parser("compare", help="a trace and a routing profile side by side")
    _trace_arguments(compare)
    compare.add_argument("--profile", required=True, help="shipped profile name or profile YAML path")
    compare.add_argument("--out", type=Path, help="folder for the tables (CSV) and figures (PNG)")
    compare.set_defaults(handler=_routing_compare)
    convert = routing_commands.add_parser(
        "import-flame", help="convert FLAME-MoE layerNN.csv files to lynxsim's format"
    )
    convert.add_argument("source", type=Path, help="folder of layerNN.csv files")
    convert.add_argument("dest", type=Path, help=".npz file to write")
    convert.set_defaults(handler=_routing_import_flame)

    add_calibrate_parser(commands)
    add_validate_parser(commands)
    add_quality_parser(commands)
    add_sweep_parsers(commands)
    add_report_parser(commands)

    plot = commands.add_parser("plot", help="redraw the figures of a run directory, or draw a sweep's figures")
    plot.add_argument("run_dir", type=Path, help="run directory, or results folder of a sweep")
    plot.add_argument("--metric", action="append", help="sweep: metric to draw against each swept key (repeatable)")
    plot.add_argument("--x", action="append", help="sweep: swept key to put on the x axis (repeatable)")
    plot.set_defaults(handler=_plot)

    trace = commands.add_parser(
        "trace", help="write a run's timeline as one Chrome trace per policy, for Perfetto or chrome://tracing")
    trace.add_argument("run_dir", type=Path, help="run directory")
    trace.add_argument("--out", type=Path, help="folder of the traces (default: RUN_DIR/trace)")
    trace.add_argument("--window", type=float, nargs=2, metavar=("START_S", "END_S"),
                       help="only what happens between these simulated times")
    trace.add_argument("--max-events", type=int, default=MAX_EVENTS,
                       help=f"events per trace at most (default {MAX_EVENTS:,}): past it, requests are sampled and "
                            "then the window is cut; the file's otherData says what was kept")
    trace.set_defaults(handler=_trace)

    html = commands.add_parser(
        "html", help="write one self-contained HTML page (interactive figures) of a run directory or of a sweep")
    html.add_argument("folder", type=Path, help="run directory, or results folder of a sweep")
    html.add_argument("--out", type=Path, help="HTML file to write (default: FOLDER/report.html)")
    html.set_defaults(handler=_html)
    return parser


def _experiment_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("experiment", type=Path, help="experiment YAML file")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
        help="override a config key (repeatable), e.g. --set workload.arrival.rate_per_s=4",
    )


def _trace_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("trace", type=Path, help="lynxsim .npz trace or folder of FLAME-MoE layerNN.csv files")
    parser.add_argument("--top-k", type=int, help="experts per token (default: what the trace recorded)")
    parser.add_argument("--fill", choices=FILL_STRATEGIES, default=DEFAULT_FILL, help="fill of top-k-only traces")
    parser.add_argument("--seed", type=int, default=0)


def _trace_and_top_k(args: argparse.Namespace) -> tuple[RoutingTrace, int]:
    trace = open_trace(args.trace, fill=args.fill)
    top_k = args.top_k or trace.recorded_top_k
    if top_k is None:
        raise InputError("--top-k", f"{args.trace} holds full logits: say how many experts each token uses")
    return trace, top_k


def _routing_fit(args: argparse.Namespace, console: Console) -> int:
    if is_statistics_file(args.trace):
        from lynxsim.routing.evidence_report import fit_and_save

        if args.check is not None and not is_statistics_file(args.check):
            raise InputError("--check", f"{args.check} is not a routing statistics file")
        result = fit_and_save(args.trace, args.out, check_path=args.check, seed=args.seed)
        console.print(f"fitted {args.trace} ({result.model}): {args.out}")
        for label, residuals in (("fit data", result.fit), ("check data", result.check)):
            for r in residuals:
                console.print(f"  {label}: {r.name}: data {np.mean(r.data):.3f}, generator {np.mean(r.generator):.3f} "
                              f"({r.unit}; largest layer error {np.abs(r.relative_error()).max():.1%})",
                              markup=False, highlight=False)
        return 0
    if args.check is not None:
        raise InputError("--check", "only a statistics fit takes a check file")
    trace, top_k = _trace_and_top_k(args)
    try:
        fit = fit_routing(trace, top_k, seed=args.seed)
    except ValueError as exc:
        raise InputError(str(args.trace), str(exc)) from None
    path = save_profile(fit.params, args.out, source_trace=trace, stats=fit.stats)
    console.print(f"fitted {trace.name} ({trace.num_layers} layers, {trace.num_experts} experts, top-{top_k}): {path}")
    return 0


def _routing_evidence(args: argparse.Namespace, console: Console) -> int:
    from lynxsim.routing.evidence_report import write_evidence

    console.print(f"wrote {write_evidence(args.out)}")
    return 0


def _routing_compare(args: argparse.Namespace, console: Console) -> int:
    trace, top_k = _trace_and_top_k(args)
    profile = Path(args.profile)
    params = load_profile(profile if profile.suffix in (".yaml", ".yml") else profile_path(args.profile))
    try:
        result = compare_routing(trace, params, top_k, seed=args.seed)
    except ValueError as exc:
        raise InputError(str(args.trace), str(exc)) from None
    curve = result["distinct_experts"].groupby("batch_size")[["trace", "generator"]].mean()
    table = Table(title=f"distinct experts per layer (mean over layers), top-{top_k}: {trace.name} vs {args.profile}")
    for column in ("batch size", "trace", "generator", "gap"):
        table.add_column(column, justify="right")
    for size, row in curve.iterrows():
        table.add_row(str(size), f"{row.trace:.2f}", f"{row.generator:.2f}", f"{row.generator / row.trace - 1:+.2%}")
    console.print(table)
    variability = result["variability"]
    console.print(
        f"per-batch load CV at batch {int(variability['batch_size'].iloc[0])}: trace "
        f"{variability['trace_per_batch_cv'].mean():.3f}, "
        f"generator {variability['generator_per_batch_cv'].mean():.3f}; "
        f"aggregate: trace {variability['trace_aggregate_cv'].mean():.3f}, "
        f"generator {variability['generator_aggregate_cv'].mean():.3f}"
    )
    gap = result["gap"]
    console.print(gap.to_string(index=False))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        for name, frame in result.items():
            frame.to_csv(args.out / f"{name}.csv", index=False)
        paths = compare_figures(result, args.out)
        console.print(f"tables and figures: {args.out} ({', '.join(p.name for p in paths)})")
    return 0


def _routing_import_flame(args: argparse.Namespace, console: Console) -> int:
    path = import_flame(args.source, args.dest)
    console.print(f"wrote {path}")
    return 0


def _run(args: argparse.Namespace, console: Console) -> int:
    config = load_experiment(args.experiment, args.overrides)
    out_dir: Path = args.out or config.output.dir
    started = time.perf_counter()
    if config.sweep is not None:
        console.print("[yellow]note[/]: running the base experiment; its 'sweep' section runs with lynxsim sweep")

    def report(run: PolicyRun) -> None:
        console.print(f"[green]done[/] {run.label}: {run.summary['simulated_s']:.1f} simulated s in {run.wall_s:.1f} s")

    progress = run_progress(console)
    bars: dict[str, TaskID] = {}

    def advance(label: str, arrived: int, total: int) -> None:
        if label not in bars:
            bars[label] = progress.add_task(label, total=total)
        progress.update(bars[label], completed=arrived)

    with progress:
        result = run_experiment(config, out_dir, on_policy_done=report, on_arrivals=advance)
    frame = result.summary_frame()
    setup = result.setup
    title = f"{config.name}: {setup.model.name} on {setup.hardware.name} (cost model: {setup.cost_model.source})"
    console.print(summary_table(frame, title, with_slo=config.slo.has_target))
    console.print(f"routing: {setup.routing_evidence}", markup=False, highlight=False)
    warnings = summary_warnings(frame)
    for warning in warnings:
        console.print(f"[yellow]warning[/]: {warning}", highlight=False)
    if config.output.figures and not args.no_figures:
        records = load_run(out_dir)
        paths = write_run_figures(records, setup.model.num_experts, out_dir / "figures", context=run_context(out_dir))
        console.print(f"figures: {', '.join(str(p) for p in paths)}")
    if args.trace:
        _print_traces(write_traces(out_dir), console)
    console.print(f"records: {out_dir}  (wall time {time.perf_counter() - started:.1f} s)")
    return 1 if warnings and args.strict else 0


def summary_table(frame: pd.DataFrame, title: str, *, with_slo: bool) -> Table:
    """The summary table ``lynxsim run`` prints: the cells of ``summary_columns.summary_cells``."""
    cells = summary_cells(frame, with_slo=with_slo)
    table = Table(title=title, caption=cells.legend)
    for header in cells.headers:
        table.add_column(header, justify="left" if header == "policy" else "right", no_wrap=True)
    for row in cells.rows:
        table.add_row(*row)
    return table


def summary_warnings(frame: pd.DataFrame) -> list[str]:
    """What a reader of the table must not miss: requests the engine refused, requests left unfinished at the
    cut-off, a policy with no request measured (the warm-up covers the run)."""
    warnings = []
    for label, row in frame.iterrows():
        arrived = int(row["requests_arrived"])
        if row["requests_rejected"] > 0:
            warnings.append(f"{label}: {int(row['requests_rejected'])} of {arrived} requests rejected (a prompt plus "
                            "output longer than the KV cache or the serving limits)")
        if row["requests_unfinished"] > 0:
            warnings.append(f"{label}: {int(row['requests_unfinished'])} of {arrived} requests unfinished at the "
                            "cut-off (their latencies are not in the statistics)")
        if row["requests_measured"] == 0:
            warnings.append(f"{label}: no request measured (none arrived after simulation.warmup_s and finished "
                            "before the end): its latencies are empty")
    return warnings


def _capacity(args: argparse.Namespace, console: Console) -> int:
    config = load_experiment(args.experiment, args.overrides)
    prepare(config)  # every configuration problem before the first probe
    out_dir: Path = args.out or config.output.dir
    _check_writable(out_dir)  # before the search, not after it
    slo = config.slo
    targets = ", ".join(
        f"{name} <= {value * 1e3:g} ms" for name, value in (("TTFT", slo.ttft_s), ("TPOT", slo.tpot_s)) if value
    )

    def report(label: str, probe: CapacityProbe) -> None:
        verdict = "[green]meets[/]" if probe.meets_slo else "[red]misses[/]"
        console.print(f"{label}: {probe.rate_per_s:.3f} req/s -> attainment {probe.slo_attainment:.3f} {verdict}")

    results = [
        find_capacity(config, index, rel_tolerance=args.tolerance, on_probe=report)
        for index in range(len(config.policies))
    ]
    table = Table(title=f"{config.name}: capacity at {slo.attainment:.0%} of requests with {targets}")
    for column in ("policy", "req/s", "ratio", "attainment", "TPOT p99 ms", "TTFT p99 ms", "pure-decode", "probes"):
        table.add_column(column, justify="left" if column == "policy" else "right")
    rows = []
    for result in results:
        at = result.at_capacity
        summary = at.summary if at is not None else {}
        ratio = result.rate_per_s / results[0].rate_per_s if results[0].rate_per_s > 0 else float("nan")
        rows.append(
            {
                "policy": result.label,
                "capacity_rate_per_s": result.rate_per_s,
                "ratio": ratio,
                "slo_attainment": at.slo_attainment if at is not None else float("nan"),
                "tpot_p99_ms": summary.get("tpot_p99_ms", float("nan")),
                "ttft_p99_ms": summary.get("ttft_p99_ms", float("nan")),
                "pure_decode_fraction": summary.get("pure_decode_fraction", float("nan")),
                "probes": len(result.probes),
            }
        )
        table.add_row(
            result.label,
            format_cell(result.rate_per_s, "{:.3f}"),
            format_cell(ratio, "{:.3f}"),
            format_cell(rows[-1]["slo_attainment"], "{:.3f}"),
            format_cell(rows[-1]["tpot_p99_ms"], "{:.2f}"),
            format_cell(rows[-1]["ttft_p99_ms"], "{:.1f}"),
            format_cell(rows[-1]["pure_decode_fraction"], "{:.3f}"),
            str(len(result.probes)),
        )
    console.print(table)
    out_dir.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(out_dir / "capacity.csv", index=False)
    console.print(f"capacity table: {out_dir / 'capacity.csv'}")
    return 0


def _check_writable(folder: Path) -> None:
    """Create ``folder`` and write a file in it, so that a command whose output cannot be written stops before
    its work rather than after (``OSError``: one line, ``errors.exit_code``)."""
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f".lynxsim-write-check-{os.getpid()}"
    probe.write_bytes(b"")
    probe.unlink()


def _check(args: argparse.Namespace, console: Console) -> int:
    config = load_experiment(args.experiment, args.overrides)
    setup = prepare(config)
    model = setup.model
    console.print(f"[bold]{config.name}[/]: valid")
    console.print(
        f"model {model.name}: {model.total_params / 1e9:.1f} B params, {model.weight_bytes / 1e9:.1f} GB weights, "
        f"{model.num_moe_layers} MoE layers x {model.num_experts} experts, top-{model.top_k}"
    )
    overhead_ms = setup.hardware.efficiency.iteration_overhead_s * 1e3
    console.print(
        f"hardware {setup.hardware.name}; cost model: {setup.cost_model.source}; host overhead {overhead_ms:g} ms"
        " per iteration"
    )
    console.print(f"routing: {setup.routing_evidence}", markup=False, highlight=False)
    tokens = setup.kv_cache_blocks * config.serving.block_size_tokens
    console.print(f"KV cache: {setup.kv_cache_blocks} blocks ({tokens} tokens)")
    console.print(f"requests: {len(setup.requests)}; policies: {', '.join(label for label, _, _ in setup.policies)}")
    console.print(f"at most about {estimate(config, model).peak_bytes / 1e9:.1f} GB of memory and "
                  f"{wall_time_s(config, model, setup.requests):,.0f} s to simulate (lynxsim.preflight; a run is "
                  f"refused past {MEMORY_SHARE:.0%} of the memory available or simulation.max_wall_s)")
    if config.sweep is not None:
        sweep = load_sweep(args.experiment, args.overrides)
        console.print(
            f"sweep: {len(sweep.points)} points, {sweep.distinct_runs} distinct runs, over {', '.join(sweep.keys)}"
        )
    return 0


# (catalog_summary column, header, format) of the rows `lynxsim models` prints
MODEL_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("key", "model", "{}"),
    ("layers", "layers", "{}"),
    ("moe_layers", "MoE", "{}"),
    ("experts", "experts", "{}"),
    ("top_k", "k", "{}"),
    ("shared_experts", "shared", "{}"),
    ("expert_mb", "expert MB", "{:.1f}"),
    ("total_params_b", "total B", "{:.2f}"),
    ("active_params_b", "active B", "{:.2f}"),
    ("published_total_b", "published B", "{:.1f}"),
    ("total_rel_error", "error", "{:+.2%}"),
    ("weight_gb", "weights GB", "{:.1f}"),
    ("kv_bytes_per_token", "KV B/token", "{:,.0f}"),
    ("lynx_alpha", "Lynx alpha", "{:g}"),
    ("lynx_beta", "Lynx beta", "{:g}"),
)


def _models(args: argparse.Namespace, console: Console) -> int:
    frame = catalog_summary()
    table = Table(title="lynxsim model catalog (B = 1e9 parameters)")
    for _, header, _ in MODEL_COLUMNS:
        table.add_column(header, justify="left" if header == "model" else "right")
    for _, row in frame.iterrows():
        table.add_row(*(format_cell(row[column], fmt) for column, _, fmt in MODEL_COLUMNS))
    console.print(table)
    return 0


def _hardware(args: argparse.Namespace, console: Console) -> int:
    table = Table(title="lynxsim hardware profiles")
    for column in (
        "profile", "name", "memory (GiB)", "bandwidth (TB/s)", "sustained (TB/s)", "bf16 (TFLOP/s)", "measured tables"
    ):
        table.add_column(column)
    for key in hardware_names():
        hw = load_hardware(key)
        table.add_row(
            key,
            hw.name,
            f"{hw.memory_bytes / 2**30:.1f}",  # what nvidia-smi reports, in the unit datasheets call GB
            f"{hw.memory_bandwidth_bytes_per_s / 1e12:.2f}",
            f"{hw.sustained_bandwidth_bytes_per_s / 1e12:.2f}",
            f"{hw.dense_bf16_flops_per_s / 1e12:.0f}",
            str(len(hw.measured.tables)),
        )
    console.print(table)
    return 0


def _plugins(args: argparse.Namespace, console: Console) -> int:
    table = Table(title="components an experiment can name (docs/extending.md)")
    for column in ("kind", "name", "parameters", "from", "entry-point group"):
        table.add_column(column)
    for registry in REGISTRIES:
        for name in (*registry.builtin_names, *registry.plugin_names()):
            parameters = [*registry.parameters(name), *(["..."] if registry.takes_any_parameter(name) else [])]
            table.add_row(registry.kind, name, ", ".join(parameters) or "-", registry.origin(name), registry.group)
    console.print(table)
    return 0


def _trace(args: argparse.Namespace, console: Console) -> int:
    window = tuple(args.window) if args.window is not None else None
    _print_traces(write_traces(args.run_dir, args.out, window_s=window, max_events=args.max_events), console)
    return 0


def _print_traces(written: list[TraceWritten], console: Console) -> None:
    for trace in written:
        kept = f"; kept: {'; '.join(trace.notes)}" if trace.notes else ""
        console.print(f"trace: {trace.path} ({trace.events:,} events, {trace.path.stat().st_size / 1e6:.1f} MB, "
                      f"{trace.seconds:.1f} s{kept}); open it in https://ui.perfetto.dev", highlight=False)


def _plot(args: argparse.Namespace, console: Console) -> int:
    run_dir: Path = args.run_dir
    if (run_dir / DATABASE_NAME).is_file():
        return plot_sweep(run_dir, args.metric, args.x, console)
    records, num_experts = read_run(run_dir)
    paths = write_run_figures(records, num_experts, run_dir / "figures", context=run_context(run_dir))
    console.print(f"figures: {', '.join(str(p) for p in paths)}")
    return 0


def _html(args: argparse.Namespace, console: Console) -> int:
    from lynxsim.html_report import write_html  # plotly: imported by this command only, not on every start

    started = time.perf_counter()
    path = write_html(args.folder, args.out)
    console.print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB in {time.perf_counter() - started:.1f} s)")
    return 0
