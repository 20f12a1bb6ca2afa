"""``lynxsim calibrate`` and ``lynxsim validate``: argparse wiring for ``lynxsim/cli.py``.

``cli.py`` calls ``add_calibrate_parser(subparsers)`` and ``add_validate_parser(subparsers)``; each sets
``handler(args, console) -> int`` as the other commands do. Importing this module never imports torch: the
handlers import the GPU modules (``sweeps``, ``validate``) inside the handler, and only on the paths that time
or execute kernels. ``--dry-run``, ``--merge`` and ``--record`` need no torch at all. The module also runs on
its own (``python -m lynxsim.calib.commands calibrate ...``), which is how the GPU machine calls it.

Typical use:
  lynxsim calibrate --models mixtral-8x7b olmoe-1b-7b            # time the sweeps on this GPU, write the h200 profile
  lynxsim calibrate --merge tables/*.yaml                         # merge table files measured elsewhere
  lynxsim calibrate --dry-run                                     # print the plan (points per table)
  lynxsim validate --models olmoe-1b-7b --out docs                # simulate, execute on the GPU, compare, report
  lynxsim validate --record iterations.npz                        # simulate and select only (no GPU)
  lynxsim calibrate --models mixtral-8x7b --tensor-parallel 2      # tables of one TP2 rank: mixtral-8x7b@tp2
  lynxsim validate --models mixtral-8x7b --tensor-parallel 2       # execute TP2 iterations on two GPUs (NCCL)
  lynxsim calibrate --models qwen3-30b-a3b --expert-parallel 4     # one EP4 rank's MoE table: qwen3-30b-a3b@ep4
  lynxsim calibrate --kernels reference --tables-out ref/ --no-profile   # the first, unfused kernels, to compare
  lynxsim calibrate --efficiency docs                             # no GPU: docs/kernel_efficiency.{md,csv}
  lynxsim calibrate --models mixtral-8x7b --expert-dtype fp8      # FP8 (W8A8) experts' moe table: mixtral-8x7b@fp8
  lynxsim validate --models mixtral-8x7b --expert-dtype fp8 --stem validation_fp8   # FP8 experts, end to end
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lynxsim.errors import InputError, exit_code

DEFAULT_CALIBRATION_MODELS = ("mixtral-8x7b", "qwen3-30b-a3b", "olmoe-1b-7b", "deepseek-v2-lite")
DEFAULT_VALIDATION_MODELS = ("mixtral-8x7b", "qwen3-30b-a3b", "olmoe-1b-7b", "deepseek-v2-lite")
DEFAULT_REFERENCE_TABLES = Path("docs/measurements/reference_kernels_h200")
"""The H200 tables of the reference (unfused) kernel set, measured 2026-11-28, kept to compare with."""
DEFAULT_VALIDATION_POLICIES = ("topk", "lynx")


# ----- shared helpers --------------------------------------------------------------------------------------------


def profile_path(name_or_path: str) -> Path:
    """The YAML file of a hardware profile given by key (``h200``) or path."""
    from lynxsim.hardware import hardware_names, profile_dirs

    candidate = Path(name_or_path)
    if candidate.is_file():
        return candidate
    if "/" in name_or_path or candidate.suffix in (".yaml", ".yml"):
        raise InputError(name_or_path, "hardware profile file not found")
    for directory in profile_dirs():
        path = directory / f"{name_or_path}.yaml"
        if path.is_file():
            return path
    raise InputError("--profile", f"unknown hardware profile {name_or_path!r}; known: {', '.join(hardware_names())}")


def _model(key: str) -> Any:
    from lynxsim.models import load_catalog_model

    return load_catalog_model(key)


def shrunk_model(model: Any, factor: int) -> Any:
    """``model`` with its widths divided by ``factor`` (hidden size, FFN widths, vocabulary, heads; layers and
    experts kept, so a simulated run's expert counts still fit): for CPU smoke runs of the GPU code paths."""
    if factor <= 1:
        return model
    from lynxsim.models.spec import ModelSpec

    data = model.model_dump()
    att = dict(data["attention"])
    heads = max(1, att["num_heads"] // factor)
    kv = max(1, min(att["num_kv_heads"], heads))
    while heads % kv:
        kv -= 1
    att.update(num_heads=heads, num_kv_heads=kv, head_dim=max(16, att["head_dim"] // 4))
    for key in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
        if att.get(key):
            att[key] = max(16, att[key] // 4)
    data["attention"] = att
    data["hidden_size"] = max(64, data["hidden_size"] // factor)
    data["vocab_size"] = max(256, data["vocab_size"] // factor)
    for key in ("expert_ffn_size", "shared_expert_ffn_size", "dense_ffn_size"):
        if data.get(key):
            data[key] = max(32, data[key] // factor)
    data["name"] = f"{model.name} (widths / {factor})"
    return ModelSpec.model_validate(data)


def _tp_plan(args: argparse.Namespace) -> Any:
    from lynxsim.parallel import ParallelPlan

    if args.tensor_parallel < 1:
        raise InputError("--tensor-parallel", f"must be >= 1, got {args.tensor_parallel}")
    return ParallelPlan(tensor_parallel=args.tensor_parallel)


def _shard(model: Any, args: argparse.Namespace) -> Any:
    """What one GPU of the ``--tensor-parallel`` group holds: the model itself at TP1."""
    from lynxsim.parallel import check_plan, shard_model

    plan = _tp_plan(args)
    try:
        check_plan(model, plan)
    except InputError as exc:
        raise InputError("--tensor-parallel", exc.problem) from None
    return shard_model(model, plan)


def _table_key(key: str, args: argparse.Namespace) -> str:
    """Table names of a TP rank's shard, ``<model-key>@tp<G>``, of an EP rank's experts, ``<model-key>@ep<N>``,
    or of quantized experts, ``<model-key>@fp8`` (``lynxsim.cost.expert_table_key``), as the cost models look
    them up."""
    if getattr(args, "expert_dtype", None) is not None:
        from lynxsim.cost import expert_table_key

        return expert_table_key(_with_expert_dtype(_model(key), args), key)
    if getattr(args, "expert_parallel", 1) > 1:
        return f"{key}@ep{args.expert_parallel}"
    return f"{key}@tp{args.tensor_parallel}" if args.tensor_parallel > 1 else key


def _with_expert_dtype(model: Any, args: argparse.Namespace) -> Any:
    """``model`` with its routed experts in ``--expert-dtype`` (unchanged without the option). Quantized experts
    are measured on one GPU holding every expert: the option refuses --tensor-parallel and --expert-parallel. A
    model whose experts stay in a dtype the kernels do not run (gpt-oss-120b's MXFP4) is refused."""
    from lynxsim.calib.plan import KERNEL_EXPERT_DTYPES

    dtype = getattr(args, "expert_dtype", None)
    if dtype is None:
        own = model.expert_weight_dtype or model.weight_dtype
        if own not in KERNEL_EXPERT_DTYPES:
            raise InputError("--models", f"{model.name}'s routed experts are {own}; the calibration kernels run "
                                         f"{' or '.join(KERNEL_EXPERT_DTYPES)} experts (give --expert-dtype; README: "
                                         "Quantized experts)")
        return model
    if args.tensor_parallel > 1 or getattr(args, "expert_parallel", 1) > 1:
        raise InputError("--expert-dtype", "expert tables of another dtype are measured on one GPU holding every "
                                           "expert: leave out --tensor-parallel and --expert-parallel")
    from lynxsim.models.spec import ModelSpec

    return ModelSpec.model_validate({**model.model_dump(), "expert_weight_dtype": dtype})


def _expert_parallel(model: Any, args: argparse.Namespace) -> Any:
    """The model whose EP rank ``--expert-parallel`` times (the whole model: a rank holds whole experts)."""
    if args.expert_parallel < 1:
        raise InputError("--expert-parallel", f"must be >= 1, got {args.expert_parallel}")
    if args.tensor_parallel > 1:
        raise InputError("--expert-parallel", "an EP rank's experts are whole: give --tensor-parallel or "
                                              "--expert-parallel, not both (the rank's attention is a TP shard)")
    if model.num_experts % args.expert_parallel:
        raise InputError("--expert-parallel", f"{model.name}'s {model.num_experts} experts do not divide over "
                                              f"{args.expert_parallel} ranks")
    return model


def _metadata_now(gpu_name: str, torch_version: str, cuda_version: str, notes: str | None) -> Any:
    from lynxsim.hardware import CalibrationMetadata

    return CalibrationMetadata(
        gpu_name=gpu_name, torch_version=torch_version, cuda_version=cuda_version, date=dt.date.today(), notes=notes
    )


def _print(console: Any, text: str) -> None:
    if console is None:
        print(text, flush=True)
    else:
        console.print(text, markup=False, highlight=False)


# ----- calibrate -------------------------------------------------------------------------------------------------


def add_calibrate_parser(subparsers: Any) -> argparse.ArgumentParser:
    from lynxsim.calib.plan import KERNEL_EXPERT_DTYPES

    parser = subparsers.add_parser(
        "calibrate",
        help="time the model's kernels on this GPU and write measured tables into a hardware profile",
        description="Time each measured unit (MoE layer, decode and prefill attention, dense layer, embedding, "
        "LM head) over its grid with CUDA events on CUDA-graph replays, rotating among weight copies so that L2 "
        "never serves weights; write the tables into the profile (one file per model beside it).",
    )
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_CALIBRATION_MODELS), metavar="KEY",
                        help="catalog keys (default: %(default)s)")
    parser.add_argument("--profile", default="h200", help="hardware profile key or YAML path to write (default: h200)")
    parser.add_argument("--grid", choices=("default", "tiny"), default="default", help="sweep grid (tiny: smoke test)")
    parser.add_argument("--tables-out", type=Path, help="also write each model's table file into this folder")
    parser.add_argument("--no-profile", action="store_true", help="do not modify the profile (use with --tables-out)")
    parser.add_argument("--dry-run", action="store_true",
                        help="no GPU: print the plan; with --tables-out, write tables filled with roofline values")
    parser.add_argument("--merge", nargs="+", type=Path, metavar="TABLE_FILE",
                        help="no GPU: merge table files (from --tables-out on another machine) into the profile")
    parser.add_argument("--device", default="cuda", help="torch device (cpu: smoke run, no CUDA graphs or events)")
    parser.add_argument("--shrink", type=int, default=1,
                        help="divide model widths by this (CPU smoke runs; never written into the profile)")
    parser.add_argument("--repeats", type=int, default=10, help="timed graph replays per grid point (median)")
    parser.add_argument("--budget-s", type=float, default=540.0, help="time limit of one model's sweep, in seconds")
    parser.add_argument("--units", nargs="+", metavar="UNIT",
                        help="time only these units (e.g. moe); the model's other tables in the profile are kept")
    parser.add_argument("--tensor-parallel", type=int, default=1, metavar="G",
                        help="time one rank's shard of a G-way tensor-parallel instance (tables <key>@tp<G>)")
    parser.add_argument("--expert-parallel", type=int, default=1, metavar="N",
                        help="time one rank's MoE of an N-way expert-parallel instance: E/N whole experts "
                             "(table <key>@ep<N>/moe; the rank's attention and dense parts are <key>@tp<N>)")
    parser.add_argument("--kernels", choices=("production", "reference"), default="production",
                        help="production (default): fused ops around cuBLAS GEMMs and real MLA, as vLLM runs a "
                             "layer on Hopper; reference: the first, unfused torch path, kept to compare")
    parser.add_argument("--efficiency", type=Path, metavar="DIR",
                        help="no GPU: write DIR/kernel_efficiency.md and .csv (each table's time against its byte "
                             "and FLOP floors) from the profile's tables, then stop")
    parser.add_argument("--reference-tables", type=Path, metavar="DIR",
                        help="with --efficiency: table files timed with another kernel set on the same GPU, "
                             "compared unit by unit (default: docs/measurements/reference_kernels_h200 if present)")
    parser.add_argument("--expert-dtype", choices=KERNEL_EXPERT_DTYPES,
                        help="time the routed experts in this dtype instead of the model's own (fp8: the W8A8 "
                             "fused MoE kernel); only the moe table, written as <key>@fp8/moe")
    parser.add_argument("--moe-routing", choices=("random", "even"), default="random",
                        help="how the MoE sweep routes tokens over the active experts (default: random, "
                             "4 draws rotated; even: the committed 2026-11-28 tables)")
    parser.set_defaults(handler=calibrate_command)
    return parser


def calibrate_command(args: argparse.Namespace, console: Any = None) -> int:
    from lynxsim.calib.plan import plan_model, plan_summary
    from lynxsim.calib.profile_io import (
        merge_table_files,
        table_file_text,
        write_model_tables,
    )

    path = profile_path(args.profile)
    if args.merge:
        missing = [str(p) for p in args.merge if not p.is_file()]
        if missing:
            raise InputError("--merge", f"not found: {', '.join(missing)}")
        for written in merge_table_files(path, list(args.merge)):
            _print(console, f"merged into {path}: {written}")
        return 0

    if args.efficiency is not None:
        from lynxsim.calib.efficiency import write_efficiency

        reference = args.reference_tables
        if reference is None and DEFAULT_REFERENCE_TABLES.is_dir():
            reference = DEFAULT_REFERENCE_TABLES
        elif reference is not None and not reference.is_dir():
            raise InputError("--reference-tables", f"{reference} is not a folder of table files")
        for written in write_efficiency(path, None, args.efficiency, reference):
            _print(console, f"wrote {written}")
        return 0

    if args.expert_parallel > 1:
        specs = {_table_key(key, args): _expert_parallel(shrunk_model(_model(key), args.shrink), args)
                 for key in args.models}
    else:
        specs = {_table_key(key, args): _shard(_with_expert_dtype(shrunk_model(_model(key), args.shrink), args), args)
                 for key in args.models}
    plans = {key: plan_model(key, spec, args.grid, expert_parallel=args.expert_parallel) for key, spec in specs.items()}
    quantized = [key for key in specs if args.expert_dtype and key.endswith(f"@{args.expert_dtype}")]
    if quantized:
        if args.units and set(args.units) != {"moe"}:
            raise InputError("--units", "with --expert-dtype only the moe table is timed (the other units do not "
                                        "touch the experts): give --units moe or leave --units out")
        plans = {key: [p for p in model_plans if p.unit == "moe" or key not in quantized]
                 for key, model_plans in plans.items()}
    if args.units:
        from lynxsim.cost import DIAGNOSTIC_UNITS, MEASURED_UNITS

        known = [*MEASURED_UNITS, *DIAGNOSTIC_UNITS]
        unknown = sorted(set(args.units) - set(known))
        if unknown:
            raise InputError("--units", f"unknown units {unknown}; known: {', '.join(known)}")
        plans = {key: [p for p in model_plans if p.unit in args.units] for key, model_plans in plans.items()}
    if args.dry_run:
        for key, model_plans in plans.items():
            _print(console, f"{key} ({specs[key].name}):\n{plan_summary(model_plans)}")
        if args.tables_out is not None:
            from lynxsim.calib.plan import roofline_tables
            from lynxsim.hardware import load_hardware

            hardware = load_hardware(path)
            metadata = _metadata_now("dry run: roofline values, not measurements", "none", "none",
                                     f"lynxsim calibrate --dry-run, grid {args.grid}")
            args.tables_out.mkdir(parents=True, exist_ok=True)
            for key, model_plans in plans.items():
                tables = roofline_tables(model_plans, specs[key], hardware)
                out = args.tables_out / f"{key}.yaml"
                out.write_text(table_file_text(key, metadata, tables), encoding="utf-8")
                _print(console, f"wrote {out}")
        return 0

    if args.shrink > 1 and not args.no_profile:
        raise InputError(
            "--shrink", "tables of shrunk models never go into a profile: add --no-profile (and --tables-out)"
        )
    from lynxsim.calib.sweeps import calibrate_model  # torch from here on

    failed = []
    for key, model_plans in plans.items():
        started = time.perf_counter()
        _print(console, f"calibrating {key}: {sum(p.num_points for p in model_plans)} grid points")
        try:
            metadata, tables = calibrate_model(
                key, specs[key], model_plans, device=args.device, repeats=args.repeats, budget_s=args.budget_s,
                log=lambda text: _print(console, text), moe_routing=args.moe_routing, kernels=args.kernels,
                expert_parallel=args.expert_parallel,
            )
        except Exception:  # noqa: BLE001  (one model's failure must not cost the others' device time)
            import traceback

            _print(console, f"FAILED {key}:\n{traceback.format_exc()}")
            failed.append(key)
            continue
        _print(console, f"calibrated {key} in {time.perf_counter() - started:.1f} s")
        if args.units:  # keep the model's other tables, measured earlier
            from lynxsim.hardware import load_hardware

            earlier = load_hardware(path).measured.tables
            tables = {**{n: t for n, t in earlier.items() if n.startswith(f"{key}/")}, **tables}
            metadata = metadata.model_copy(
                update={"notes": f"{metadata.notes}; the other units' tables are kept from the earlier run"}
            )
        if args.tables_out is not None:
            args.tables_out.mkdir(parents=True, exist_ok=True)
            out = args.tables_out / f"{key}.yaml"
            out.write_text(table_file_text(key, metadata, tables), encoding="utf-8")
            _print(console, f"wrote {out}")
        if not args.no_profile:
            written = write_model_tables(path, key, tables, metadata)
            _print(console, f"wrote {written} and {path}")
    if failed:
        _print(console, f"calibration failed for {', '.join(failed)}")
        return 1
    return 0


# ----- validate --------------------------------------------------------------------------------------------------


def add_validate_parser(subparsers: Any) -> argparse.ArgumentParser:
    from lynxsim.calib.plan import KERNEL_EXPERT_DTYPES

    parser = subparsers.add_parser(
        "validate",
        help="execute simulated iterations on the GPU and compare measured with predicted latency",
        description="Simulate each model under each policy (a burst of 256 requests: decode batches 256 down to "
        "1 and mixed prefill/decode iterations), pick iterations, execute each with the real kernels (all layers, "
        "random weights, KV caches of the recorded lengths, the recorded per-layer expert assignment) as one CUDA "
        "graph, and compare with the cost model's prediction. Writes validation.csv and validation.md "
        "(--stem: other names).",
    )
    parser.add_argument("--models", nargs="+", metavar="KEY",
                        help="catalog keys (default: those of --iterations, else "
                        f"{' '.join(DEFAULT_VALIDATION_MODELS)})")
    parser.add_argument("--policies", nargs="+", default=list(DEFAULT_VALIDATION_POLICIES), metavar="NAME")
    parser.add_argument("--profile", default="h200", help="hardware profile (its measured tables predict)")
    parser.add_argument("--out", type=Path, default=Path("docs"), help="folder for STEM.csv and STEM.md")
    parser.add_argument("--stem", default="validation",
                        help="name of the two files written (default: validation), so that several validations "
                             "(one GPU, a TP shard) can share a folder")
    parser.add_argument("--record", type=Path, metavar="NPZ",
                        help="no GPU: simulate, select the iterations and save them to this file; then stop")
    parser.add_argument("--iterations", type=Path, metavar="NPZ", help="iterations saved by --record (no simulation)")
    parser.add_argument("--tables", nargs="+", type=Path, metavar="TABLE_FILE",
                        help="predict from these table files instead of the profile's tables")
    parser.add_argument("--dry-run", action="store_true",
                        help="no GPU: 'measure' each iteration with the roofline (tests the pipeline only)")
    parser.add_argument("--measured", type=Path, metavar="CSV",
                        help="no GPU: take the measurements of an earlier validation.csv and compare them with "
                             "today's predictions (after a recalibration or a cost-model change)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shrink", type=int, default=1, help="divide model widths by this (CPU smoke runs)")
    parser.add_argument("--repeats", type=int, default=10, help="timed replays per iteration (median)")
    parser.add_argument("--limit", type=int, help="execute at most this many iterations per model and policy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--requests", type=int, default=256, help="requests of the simulated burst (max decode batch)")
    parser.add_argument("--tensor-parallel", type=int, default=1, metavar="G",
                        help="simulate G-way tensor-parallel instances and execute them on G GPUs (NCCL)")
    parser.add_argument("--shard-on-one-gpu", action="store_true",
                        help="with --tensor-parallel G: execute one rank's shard on one GPU, without the "
                             "collectives, and compare with the prediction minus its communication (checks the "
                             "shard's tables where G GPUs are not at hand)")
    parser.add_argument("--kernels", choices=("production", "reference"), default="production",
                        help="the kernel set that executes the iterations (as calibrate's --kernels)")
    parser.add_argument("--expert-dtype", choices=KERNEL_EXPERT_DTYPES,
                        help="execute and predict the models with their routed experts in this dtype (fp8: the "
                             "W8A8 fused MoE kernel, priced from the <key>@fp8/moe tables)")
    parser.set_defaults(handler=validate_command)
    return parser


def _cost_models(args: argparse.Namespace, specs: dict[str, Any]) -> dict[str, Any]:
    """Per model, the cost model that predicts: from --tables files, else the profile's (measured where it has
    the model's tables, roofline otherwise); at --tensor-parallel G, the instance's (the shard's tables
    ``<key>@tp<G>`` plus the all-reduces)."""
    from lynxsim.cost import MeasuredCostModel, expert_table_key
    from lynxsim.hardware import load_hardware
    from lynxsim.parallel import make_instance_cost_model

    hardware = load_hardware(profile_path(args.profile))
    if args.tables:
        from lynxsim.calib.profile_io import read_table_file

        merged: dict[str, Any] = {}
        metadata = None
        for path in args.tables:
            _, metadata, tables = read_table_file(path)
            merged.update(tables)
        measured = hardware.measured.model_copy(update={"metadata": metadata, "tables": merged, "table_metadata": {}})
        hardware = hardware.model_copy(update={"measured": measured})
        if args.tensor_parallel == 1:
            return {key: MeasuredCostModel(spec, hardware, key, moe_key=expert_table_key(spec, key))
                    for key, spec in specs.items()}
    elif args.shrink > 1:
        raise InputError("--shrink", "a shrunk model needs its own tables: give --tables")
    plan = _tp_plan(args)
    return {key: make_instance_cost_model(spec, hardware, key, plan) for key, spec in specs.items()}


def validate_command(args: argparse.Namespace, console: Any = None) -> int:
    import pandas as pd

    from lynxsim.calib.compare import (
        error_summary,
        summary_markdown,
        with_errors,
        write_csv,
    )
    from lynxsim.calib.iterations import (
        load_iterations,
        reprice,
        save_iterations,
        select_iterations,
        simulate_and_record,
        validation_config,
    )
    from lynxsim.calib.profile_io import shown_path

    started = time.perf_counter()
    if args.iterations is not None and not args.iterations.is_file():
        raise InputError("--iterations", f"{args.iterations} not found")
    # what can be checked before the simulation is checked before it: a bad file ends the command at once
    earlier = read_measurements(args.measured) if args.measured is not None else None
    args.models = _validation_models(args.models, args.iterations)
    specs = {key: _with_expert_dtype(shrunk_model(_model(key), args.shrink), args) for key in args.models}
    if args.iterations is not None:
        cost_models = {} if args.record else _cost_models(args, specs)
        chosen = load_iterations(args.iterations, cost_models or {k: _roofline(specs[k], args) for k in specs})
        chosen = [it for it in chosen if it.policy in args.policies]
    else:
        chosen = []
        for key in args.models:
            config = validation_config(
                key, str(profile_path(args.profile)), list(args.policies), seed=args.seed, requests=args.requests,
                tensor_parallel=args.tensor_parallel,
            )
            recorded = simulate_and_record(config, key)
            for label, iterations in recorded.items():
                picked = select_iterations(iterations)
                _print(console, f"{key} {label}: {len(iterations)} iterations simulated, {len(picked)} selected")
                chosen.extend(picked)
        if args.record is None:
            cost_models = _cost_models(args, specs)
            chosen = [
                it for m in args.models for it in reprice([c for c in chosen if c.model_key == m], cost_models[m])
            ]
    if args.shard_on_one_gpu:
        if args.tensor_parallel < 2:
            raise InputError("--shard-on-one-gpu", "needs --tensor-parallel G with G >= 2")
        chosen = [_without_communication(it) for it in chosen]
    if args.limit is not None:
        limited: list[Any] = []
        seen: dict[tuple[str, str], int] = {}
        for it in chosen:
            group = (it.model_key, it.policy)
            seen[group] = seen.get(group, 0) + 1
            if seen[group] <= args.limit:
                limited.append(it)
        chosen = limited
    if args.record is not None:
        save_iterations(args.record, chosen)
        _print(console, f"wrote {len(chosen)} iterations to {args.record}")
        return 0

    def write_outputs(measured: dict[tuple[str, str, int], float], environment: dict[str, str]) -> Any:
        rows = []
        for it in chosen:
            if (it.model_key, it.policy, it.index) in measured:
                row = it.row()
                row["measured_s"] = measured[(it.model_key, it.policy, it.index)]
                row.update({column: environment.get(column, "") for column in ENVIRONMENT_COLUMNS})
                rows.append(row)
        frame = with_errors(pd.DataFrame(rows))
        summary = error_summary(frame)
        args.out.mkdir(parents=True, exist_ok=True)
        write_csv(frame, args.out / f"{args.stem}.csv")
        from lynxsim.calib.report import validation_report
        from lynxsim.hardware import load_hardware

        measured_kernels = load_hardware(profile_path(args.profile)).measured
        table_keys = [_table_key(key, args) for key in args.models]
        calibration = {key: measured_kernels.metadata_for(f"{key}/moe") for key in table_keys
                       if f"{key}/moe" in measured_kernels.tables
                       and measured_kernels.metadata_for(f"{key}/moe") is not None}
        report = validation_report(frame, summary, environment=environment,
                                   profile=shown_path(profile_path(args.profile)),
                                   wall_s=None if args.measured else time.perf_counter() - started,
                                   dry_run=bool(args.dry_run),
                                   calibration=calibration,
                                   extra="\n\n".join(note for note in (
                                       _tensor_parallel_note(args.tensor_parallel, args.shard_on_one_gpu),
                                       _expert_dtype_note(args.expert_dtype)) if note),
                                   csv_name=f"{args.stem}.csv", kernels=args.kernels)
        (args.out / f"{args.stem}.md").write_text(report, encoding="utf-8")
        return summary

    measured: dict[tuple[str, str, int], float] = {}
    if earlier is not None:
        measured, environment = earlier
        missing = [(it.model_key, it.policy, it.index) for it in chosen
                   if (it.model_key, it.policy, it.index) not in measured]
        if missing:
            raise InputError(str(args.measured),
                             f"no measurement of {len(missing)} chosen iterations, e.g. {missing[0]}")
        summary = write_outputs(measured, environment)
    elif args.dry_run:
        for key in args.models:
            roofline = _roofline(specs[key], args)
            for it in (c for c in chosen if c.model_key == key):
                latency = roofline.iteration(it.shape, it.expert_token_counts.astype("int64"))
                measured[(key, it.policy, it.index)] = roofline.gpu_time_s(latency)
        environment = {"gpu_name": "dry run: roofline figures stand in for measurements", "torch_version": "none",
                       "cuda_version": "none"}
        summary = write_outputs(measured, environment)
    else:
        from lynxsim.calib.validate import execute_iterations  # torch from here on

        environment = {}
        summary = None
        for key in args.models:  # results are written after each model, so an interrupted run keeps them
            try:
                gpus = 1 if args.shard_on_one_gpu else args.tensor_parallel
                done, environment = execute_iterations(
                    [it for it in chosen if it.model_key == key], {key: _shard(specs[key], args)}, device=args.device,
                    repeats=args.repeats, log=lambda text: _print(console, text), tensor_parallel=gpus,
                    kernels=args.kernels,
                )
                if args.shard_on_one_gpu:
                    environment = {**environment, "gpu_name": f"{environment['gpu_name']} (one TP"
                                                              f"{args.tensor_parallel} rank's shard, no collectives)"}
            except Exception:  # noqa: BLE001  (one model's failure must not cost the others' device time)
                import traceback

                _print(console, f"FAILED {key}:\n{traceback.format_exc()}")
                continue
            measured.update(done)
            summary = write_outputs(measured, environment)
        if summary is None:
            _print(console, "validation failed for every model")
            return 1
    _print(console, summary_markdown(summary))
    _print(console, f"wrote {args.out / (args.stem + '.csv')} and {args.out / (args.stem + '.md')}")
    return 0


ENVIRONMENT_COLUMNS = ("gpu_name", "torch_version", "cuda_version")


def _validation_models(asked: list[str] | None, iterations: Path | None) -> list[str]:
    """The models to validate: those asked for, each of which a recorded file must hold, or, when none are
    asked for, every model the file holds (a file recorded for a TP4 shard need not hold the default models)."""
    if iterations is None:
        return list(asked) if asked else list(DEFAULT_VALIDATION_MODELS)
    from lynxsim.calib.iterations import recorded_models

    held = recorded_models(iterations)
    if not asked:
        return held
    lacking = [key for key in asked if key not in held]
    if lacking:
        raise InputError("--models", f"{iterations} holds no iterations of {', '.join(lacking)} "
                                     f"(it holds {', '.join(held)})")
    return list(asked)


def _without_communication(it: Any) -> Any:
    """An iteration of a tensor-parallel instance as one rank's shard executes it alone: its prediction less
    the collectives (which the shard, run on one GPU, does not execute)."""
    import dataclasses

    return dataclasses.replace(it, predicted_gpu_s=it.predicted_gpu_s - it.predicted.communication_s)


def _tensor_parallel_note(gpus: int, shard_on_one_gpu: bool = False) -> str:
    """What a tensor-parallel validation adds to the method the report describes."""
    if gpus == 1:
        return ""
    if shard_on_one_gpu:
        return (
            f"**One rank of a {gpus}-way tensor-parallel instance, on one GPU.** The simulated instance is "
            f"{gpus}-way tensor-parallel; one GPU executes one rank's shard (1/{gpus} of the heads, expert and FFN "
            "widths and vocabulary; MLA's latent cache whole, as every rank holds it) without the all-reduces, and "
            f"the prediction it is compared with is the instance's minus its communication: the shard's tables "
            f"(`<model>@tp{gpus}`) are checked, the collectives are not (issue: multi-GPU validation)."
        )
    return (
        f"**Tensor parallelism ({gpus} GPUs).** The simulated instance is {gpus}-way tensor-parallel; "
        f"{gpus} processes, one per GPU, each hold one rank's shard (1/G of the heads, KV heads, expert and FFN "
        "widths and vocabulary) "
        "and execute every iteration in step, with an NCCL all-reduce of the attention output and of the experts' "
        "(or FFN's) output in every layer, captured in the iteration's CUDA graph; rank 0's median is the "
        "measurement. The prediction is the instance cost model (`lynxsim/parallel.py`): the shard's measured tables "
        f"(`<model>@tp{gpus}`, timed on one GPU) plus 2 all-reduces per layer priced by the profile's `collectives`."
    )


def _expert_dtype_note(dtype: str | None) -> str:
    """What executing the routed experts in ``dtype`` changes in the method the report describes."""
    if dtype is None:
        return ""
    return (
        f"**Routed experts in {dtype}.** Every MoE layer's routed experts execute as {dtype} (FP8: e4m3 W8A8, the "
        "fused Triton MoE kernel with per-channel weight scales and the token and intermediate rows quantized per "
        "row on the fly, at every batch size, `lynxsim/calib/kernels/moe.py`); the rest of the layer is as "
        f"described. The prediction prices the experts from the `<model>@{dtype}/moe` tables and every other unit "
        "from the model's bf16 tables (`lynxsim.cost.expert_table_key`)."
    )


def read_measurements(path: Path) -> tuple[dict[tuple[str, str, int], float], dict[str, str]]:
    """``measured_s`` per (model, policy, iteration) of an earlier validation.csv, and the environment it
    records (its ``gpu_name``, ``torch_version`` and ``cuda_version`` columns)."""
    import pandas as pd

    if not path.is_file():
        raise InputError("--measured", f"{path} not found")
    frame = pd.read_csv(path)
    needed = ["model", "policy", "iteration", "measured_s", *ENVIRONMENT_COLUMNS]
    lacking = [c for c in needed if c not in frame.columns]
    if lacking:
        raise InputError(str(path), f"lacks columns {', '.join(lacking)}")
    measured = {(str(r.model), str(r.policy), int(r.iteration)): float(r.measured_s) for r in frame.itertuples()}
    first = frame.iloc[0] if len(frame) else None
    environment = {c: str(first[c]) if first is not None else "" for c in ENVIRONMENT_COLUMNS}
    environment["gpu_name"] = f"{environment['gpu_name']}, measured earlier ({path.name})"
    return measured, environment


def _roofline(model: Any, args: argparse.Namespace) -> Any:
    """The roofline of one GPU, or of the --tensor-parallel instance (the shard's roofline plus all-reduces)."""
    from lynxsim.cost import CostModel
    from lynxsim.hardware import load_hardware
    from lynxsim.parallel import ParallelCostModel

    hardware = load_hardware(profile_path(args.profile))
    if args.tensor_parallel == 1:
        return CostModel(model, hardware)
    base = CostModel(_shard(model, args), hardware)
    return ParallelCostModel(model, hardware, _tp_plan(args), base, "roofline")


# ----- standalone entry point (the GPU machine calls this; lynxsim's cli.py wires the same parsers) ----------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lynxsim.calib.commands")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_calibrate_parser(subparsers)
    add_validate_parser(subparsers)
    args = parser.parse_args(argv)
    return exit_code(lambda: args.handler(args, None))


if __name__ == "__main__":
    sys.exit(main())
