"""``lynxsim quality``: argparse wiring for ``lynxsim/cli.py`` (``add_quality_parser(subparsers)``).

Importing this module never imports torch: the handlers import the torch modules when they run, and a
machine without torch gets one line naming the missing extra (exit code 2). It also runs on its own
(``python -m lynxsim.quality.commands train ...``), which is how the GPU machine calls it.

Typical use (the committed results: docs/quality.md):
  lynxsim quality train --model mixtral-like --steps 3000 --seed 0 --out runs/quality/mixtral-like.pt
  lynxsim quality trace runs/quality/mixtral-like.pt --out traces/lynxsim_mixtral_like.npz
  lynxsim quality evaluate runs/quality/mixtral-like.pt --out runs/quality
  lynxsim quality report runs/quality --out docs
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from lynxsim.errors import InputError, exit_code
from lynxsim.quality.corpus import (
    CALIBRATION_SEQUENCES,
    DEFAULT_TEXT_PATH,
    TRACE_LENGTH_TOKENS,
    TRACE_SEQUENCES,
)
from lynxsim.quality.shapes import SHAPES, TrainConfig, tiny


def add_quality_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``quality`` and its subcommands on the ``lynxsim`` parser's subparsers."""
    parser = subparsers.add_parser(
        "quality", help="train small MoE models; measure what each policy does to their loss"
    )
    commands = parser.add_subparsers(dest="quality_command", required=True)

    train = commands.add_parser("train", help="train one model shape from a seed; write its checkpoint")
    train.add_argument("--model", required=True, choices=sorted(SHAPES), help="model shape")
    train.add_argument("--steps", type=int, required=True, help="optimizer steps")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--batch-sequences", type=int, default=TrainConfig.batch_sequences)
    train.add_argument("--seq-len", type=int, default=TrainConfig.seq_len, help="training window (bytes)")
    train.add_argument("--tiny", action="store_true", help="the shape's routing at a width that trains on a CPU")
    train.add_argument("--out", type=Path, required=True, help="checkpoint file to write (.pt)")
    _corpus_arguments(train)
    train.set_defaults(handler=train_command)

    trace = commands.add_parser("trace", help="export a checkpoint's router logits of held-out text as a routing trace")
    trace.add_argument("checkpoint", type=Path)
    trace.add_argument("--out", type=Path, required=True, help=".npz trace file to write")
    trace.add_argument("--sequences", type=int, default=TRACE_SEQUENCES, help="held-out sequences (even: half prose, "
                       "half code)")
    trace.add_argument("--length", type=int, default=TRACE_LENGTH_TOKENS, help="tokens per sequence")
    _corpus_arguments(trace)
    trace.set_defaults(handler=trace_command)

    evaluate = commands.add_parser("evaluate", help="every policy inside the forward pass at each decode batch size")
    evaluate.add_argument("checkpoint", type=Path)
    evaluate.add_argument("--out", type=Path, required=True, help="folder for quality_<model>.csv and .json")
    evaluate.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16, 64])
    evaluate.add_argument("--sequences", type=int, default=128, help="held-out sequences (even; a multiple of each B)")
    evaluate.add_argument("--prefill-tokens", type=int, default=128, help="prompt tokens of each sequence (top-k)")
    evaluate.add_argument("--decode-tokens", type=int, default=128, help="decode steps scored per sequence")
    evaluate.add_argument("--no-sweep", action="store_true", help="default parameters only, no Lynx sweep")
    evaluate.add_argument("--calibration-sequences", type=int, default=CALIBRATION_SEQUENCES,
                          help="held-out calibration sequences for skip and prune (as for trace)")
    _corpus_arguments(evaluate)
    evaluate.set_defaults(handler=evaluate_command)

    report = commands.add_parser("report", help="quality.md and quality.csv from evaluation folders")
    report.add_argument("results", type=Path, nargs="+", help="folders written by lynxsim quality evaluate")
    report.add_argument("--out", type=Path, required=True, help="folder for quality.md and quality.csv")
    report.set_defaults(handler=report_command)
    return parser


def _corpus_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT_PATH, help="prose corpus file")
    parser.add_argument("--code-root", type=Path, help="folder of .py sources (default: this Python's stdlib)")
    parser.add_argument("--device", default="auto", help="torch device (auto: cuda when present, else cpu)")


def _print(console: Any, text: str) -> None:
    if console is None:
        print(text, flush=True)
    else:
        console.print(text, markup=False, highlight=False)


def _torch_device(name: str) -> Any:
    try:
        import torch
    except ImportError:
        raise InputError("lynxsim quality", "needs torch (pip install 'lynxsim[gpu]')") from None
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise InputError("--device", str(exc)) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device", "no CUDA device is available")
    return device


def _corpus(args: argparse.Namespace, expected: dict[str, str] | None = None) -> Any:
    from lynxsim.quality.corpus import load_corpus

    corpus = load_corpus(args.text, args.code_root)
    if expected is not None and corpus.fingerprint() != expected:
        raise InputError(str(args.checkpoint), "was trained on another corpus (SHA-256 differs): give the same "
                         f"--text and --code-root (expected {expected}, found {corpus.fingerprint()})")
    return corpus


def _positive(name: str, value: int) -> int:
    if value < 1:
        raise InputError(name, f"must be >= 1, got {value}")
    return value


def train_command(args: argparse.Namespace, console: Any = None) -> int:
    device = _torch_device(args.device)
    from lynxsim.quality.checkpoint import save_checkpoint
    from lynxsim.quality.train import train_model

    shape = tiny(SHAPES[args.model]) if args.tiny else SHAPES[args.model]
    try:
        config = TrainConfig(
            steps=args.steps, batch_sequences=args.batch_sequences, seq_len=args.seq_len, seed=args.seed
        )
    except ValueError as exc:
        raise InputError("lynxsim quality train", str(exc)) from None
    if config.seq_len > shape.max_seq_len:
        raise InputError("--seq-len", f"{config.seq_len} exceeds the shape's max_seq_len {shape.max_seq_len}")
    checkpoint = train_model(shape, config, _corpus(args), device, log=lambda line: _print(console, line))
    checkpoint.record["command"] = (
        f"lynxsim quality train --model {args.model} --steps {config.steps} --seed {config.seed} "
        f"--batch-sequences {config.batch_sequences} --seq-len {config.seq_len}{' --tiny' if args.tiny else ''} "
        f"--out {args.out}"
    )
    _print(console, f"wrote {save_checkpoint(checkpoint, args.out)}")
    return 0


def trace_command(args: argparse.Namespace, console: Any = None) -> int:
    device = _torch_device(args.device)
    from lynxsim.quality.checkpoint import load_checkpoint
    from lynxsim.quality.traces import export_trace

    checkpoint = load_checkpoint(args.checkpoint, device)
    corpus = _corpus(args, checkpoint.corpus)
    if args.sequences < 2 or args.sequences % 2:
        raise InputError("--sequences", f"must be an even number >= 2, got {args.sequences}")
    path = export_trace(checkpoint, corpus, args.out, args.sequences, _positive("--length", args.length), device)
    _print(console, f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
    return 0


def evaluate_command(args: argparse.Namespace, console: Any = None) -> int:
    device = _torch_device(args.device)
    from lynxsim.quality.checkpoint import load_checkpoint
    from lynxsim.quality.evaluate import EvalSettings, evaluate_policies
    from lynxsim.quality.points import default_points, lynx_sweep
    from lynxsim.quality.traces import calibration_tokens, router_log_probs

    checkpoint = load_checkpoint(args.checkpoint, device)
    shape = checkpoint.model.shape
    corpus = _corpus(args, checkpoint.corpus)
    try:
        settings = EvalSettings(tuple(args.batch_sizes), args.sequences, args.prefill_tokens, args.decode_tokens)
    except ValueError as exc:
        raise InputError("lynxsim quality evaluate", str(exc)) from None
    if settings.prefill_tokens + settings.decode_tokens > shape.max_seq_len:
        raise InputError("--prefill-tokens/--decode-tokens", f"together exceed max_seq_len {shape.max_seq_len}")
    if args.calibration_sequences < 2 or args.calibration_sequences % 2:
        raise InputError("--calibration-sequences", f"must be an even number >= 2, got {args.calibration_sequences}")
    calibration = router_log_probs(
        checkpoint,
        calibration_tokens(corpus, args.calibration_sequences, min(TRACE_LENGTH_TOKENS, shape.max_seq_len)),
        device,
    )
    points = default_points(shape) + ([] if args.no_sweep else lynx_sweep(shape))
    rows = evaluate_policies(checkpoint, corpus, points, settings, calibration, device,
                             log=lambda line: _print(console, line))

    _write_evaluation(rows, checkpoint, settings, args, console)
    return 0


def _write_evaluation(rows: list[Any], checkpoint: Any, settings: Any, args: argparse.Namespace, console: Any) -> None:
    """``quality_<model>.csv`` (the rows) and ``quality_<model>.json`` (recipe, training record, settings, and
    the commands that re-create them) in ``args.out``."""
    import pandas as pd

    from lynxsim.quality.evaluate import rows_as_records

    shape = checkpoint.model.shape
    args.out.mkdir(parents=True, exist_ok=True)
    csv_path = args.out / f"quality_{shape.name}.csv"
    pd.DataFrame.from_records(rows_as_records(rows)).to_csv(csv_path, index=False, float_format="%.6g")
    evaluate_line = (
        f"lynxsim quality evaluate {args.checkpoint} --out {args.out} --batch-sizes "
        f"{' '.join(map(str, settings.batch_sizes))} --sequences {settings.sequences} --prefill-tokens "
        f"{settings.prefill_tokens} --decode-tokens {settings.decode_tokens} --calibration-sequences "
        f"{args.calibration_sequences}{' --no-sweep' if args.no_sweep else ''}"
    )
    meta = {
        "shape": asdict(shape),
        "train": asdict(checkpoint.train),
        "record": checkpoint.record,
        "corpus_sha256": checkpoint.corpus,
        "settings": asdict(settings),
        "commands": [checkpoint.record.get("command", ""), evaluate_line],
        "evaluated_on": dt.date.today().isoformat(),
    }
    csv_path.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    _print(console, f"wrote {csv_path} and {csv_path.with_suffix('.json').name}")


def report_command(args: argparse.Namespace, console: Any = None) -> int:
    from lynxsim.quality.report import write_report

    command = f"lynxsim quality report {' '.join(str(p) for p in args.results)} --out {args.out}"
    try:
        csv_path, md_path = write_report(list(args.results), args.out, command)
    except ValueError as exc:
        raise InputError("lynxsim quality report", str(exc)) from None
    _print(console, f"wrote {md_path} and {csv_path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lynxsim.quality.commands")
    add_quality_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["quality", *(sys.argv[1:] if argv is None else argv)])
    return exit_code(lambda: args.handler(args, None))


if __name__ == "__main__":
    sys.exit(main())
