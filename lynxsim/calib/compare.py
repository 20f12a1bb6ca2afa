"""Validation statistics: predicted against measured iteration latency, per model and policy. No torch.

Input: one row per executed iteration with at least ``model``, ``policy``, ``kind`` (``decode`` or ``mixed``),
``predicted_s`` and ``measured_s`` (both GPU time: the CPU-side ``iteration_overhead_s`` assumption is left
out of the prediction, since no kernel measures it). The error of an iteration is
``predicted / measured - 1``; the report gives, per model and policy, the median and the 95th percentile of
its absolute value and the worst case, against the targets ``MEDIAN_TARGET`` and ``P95_TARGET``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

MEDIAN_TARGET = 0.03
P95_TARGET = 0.08
REQUIRED_COLUMNS = ("model", "policy", "kind", "predicted_s", "measured_s")


def with_errors(rows: pd.DataFrame) -> pd.DataFrame:
    """``rows`` plus ``error`` (predicted / measured - 1) and ``abs_error``."""
    missing = [c for c in REQUIRED_COLUMNS if c not in rows.columns]
    if missing:
        raise ValueError(f"validation rows lack columns {missing}")
    if (rows["measured_s"] <= 0).any():
        raise ValueError("measured_s must be positive")
    out = rows.copy()
    out["error"] = out["predicted_s"] / out["measured_s"] - 1.0
    out["abs_error"] = out["error"].abs()
    return out


def _stats(errors: np.ndarray) -> dict[str, float]:
    abs_errors = np.abs(errors)
    worst = int(np.argmax(abs_errors))
    return {
        "iterations": float(errors.size),
        "median_abs_error": float(np.median(abs_errors)),
        "p95_abs_error": float(np.percentile(abs_errors, 95)),
        "worst_error": float(errors[worst]),
        "mean_error": float(errors.mean()),
    }


def error_summary(rows: pd.DataFrame, by: tuple[str, ...] = ("model", "policy")) -> pd.DataFrame:
    """Per group: iterations, median and p95 of |error|, the worst (signed) error, the mean (signed) error,
    and whether the median and p95 meet their targets."""
    frame = rows if "error" in rows.columns else with_errors(rows)
    records = []
    for key, group in frame.groupby(list(by), sort=False):
        key = key if isinstance(key, tuple) else (key,)
        record = dict(zip(by, key, strict=True))
        record.update(_stats(group["error"].to_numpy(dtype=float)))
        records.append(record)
    summary = pd.DataFrame(records)
    if summary.empty:
        return summary
    summary["meets_median_target"] = summary["median_abs_error"] <= MEDIAN_TARGET
    summary["meets_p95_target"] = summary["p95_abs_error"] <= P95_TARGET
    return summary


def write_csv(rows: pd.DataFrame, path: Path) -> Path:
    """Every iteration's row, errors included, as CSV (times in seconds, errors as fractions)."""
    frame = rows if "error" in rows.columns else with_errors(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False, float_format="%.6g")
    return path


def _pct(value: float) -> str:
    return f"{100 * value:+.1f}%" if value < 0 else f"{100 * value:.1f}%"


def summary_markdown(summary: pd.DataFrame) -> str:
    """The per-model, per-policy error table as markdown."""
    lines = [
        "| model | policy | iterations | median abs error | p95 abs error | worst error | mean error | targets met |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for _, r in summary.iterrows():
        met = "yes" if r["meets_median_target"] and r["meets_p95_target"] else (
            "median only" if r["meets_median_target"] else ("p95 only" if r["meets_p95_target"] else "no")
        )
        lines.append(
            f"| {r['model']} | {r['policy']} | {int(r['iterations'])} | {100 * r['median_abs_error']:.1f}% | "
            f"{100 * r['p95_abs_error']:.1f}% | {_pct(r['worst_error'])} | {_pct(r['mean_error'])} | {met} |"
        )
    return "\n".join(lines)


def iterations_markdown(rows: pd.DataFrame, columns: Mapping[str, str] | None = None) -> str:
    """A compact per-iteration table (model, policy, kind, batch, experts, predicted, measured, error)."""
    frame = rows if "error" in rows.columns else with_errors(rows)
    columns = columns or {
        "model": "model", "policy": "policy", "kind": "kind", "decode_batch": "decode batch",
        "prefill_tokens": "prefill tokens", "mean_context": "mean context", "mean_distinct_experts": "experts/layer",
        "predicted_s": "predicted ms", "measured_s": "measured ms", "error": "error",
    }
    present = [c for c in columns if c in frame.columns]
    lines = ["| " + " | ".join(columns[c] for c in present) + " |", "|" + "|".join("---" for _ in present) + "|"]
    for _, r in frame.iterrows():
        cells = []
        for c in present:
            v = r[c]
            if c in ("predicted_s", "measured_s"):
                cells.append(f"{1e3 * v:.3f}")
            elif c == "error":
                cells.append(_pct(v))
            elif isinstance(v, float) and not float(v).is_integer():
                cells.append(f"{v:.1f}")
            elif isinstance(v, (int, float, np.integer, np.floating)):
                cells.append(f"{int(v)}")
            else:
                cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def overall_verdict(summary: pd.DataFrame) -> str:
    """One sentence: do all groups meet both targets."""
    if summary.empty:
        return "No iterations were validated."
    ok = bool(summary["meets_median_target"].all() and summary["meets_p95_target"].all())
    worst_median = summary["median_abs_error"].max()
    worst_p95 = summary["p95_abs_error"].max()
    verdict = "Every model/policy group meets" if ok else "Not every model/policy group meets"
    return (
        f"{verdict} the targets (median abs error <= {100 * MEDIAN_TARGET:.0f}%, "
        f"p95 <= {100 * P95_TARGET:.0f}%): the largest median is {100 * worst_median:.1f}%, the largest p95 "
        f"{100 * worst_p95:.1f}%."
    )
