"""The columns of a run's summary table, whatever shows it: ``lynxsim run`` prints it (lynxsim/cli.py) and
``lynxsim html`` writes it into the run's page (lynxsim/html_report), from the one choice of columns here.

One row per policy and the same columns whatever the number of policies, so that what a policy costs (changed or
dropped assignments, lost routing mass, rejected or unfinished requests) is always on screen beside what it buys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

# (summary key, header, format). A key ending in "_ratio" is the ratio to the first policy; REQUESTS_COLUMN puts
# the request counts in one cell.
SUMMARY_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("tpot_p50_ms", "TPOT p50", "{:.2f}"),
    ("tpot_p50_ms_ratio", "x", "{:.3f}"),
    ("tpot_p99_ms", "TPOT p99", "{:.2f}"),
    ("ttft_p50_ms", "TTFT p50", "{:.1f}"),
    ("ttft_p99_ms", "TTFT p99", "{:.1f}"),
    ("output_tokens_per_s", "tok/s", "{:.0f}"),
    ("mean_decode_batch", "batch", "{:.1f}"),
    ("mean_distinct_experts", "experts", "{:.2f}"),
    ("mean_distinct_experts_ratio", "x", "{:.3f}"),
    ("retained_mass", "mass", "{:.3f}"),
    ("top1_kept", "top-1", "{:.3f}"),
    ("assignments_changed", "changed", "{:.3f}"),
    ("assignments_dropped", "dropped", "{:.3f}"),
    ("preemptions", "preempt", "{:.0f}"),
)
REQUESTS_COLUMN = ("requests_finished", "requests_rejected", "requests_unfinished")
SLO_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("slo_attainment", "SLO met", "{:.3f}"),
    ("goodput_rps", "goodput", "{:.2f}"),
)
"""Shown only when the experiment sets an SLO target: without one, attainment and goodput mean nothing."""
PREFIX_COLUMNS: tuple[tuple[str, str, str], ...] = (("prefix_hit_rate", "prefix hit", "{:.3f}"),)
"""Shown only when a request found a cached prefix: elsewhere the share is 0 by construction."""
SUMMARY_LEGEND = ("TPOT/TTFT in ms; x: ratio to {first}; batch: mean decode batch (tokens); experts: distinct "
                  "experts per layer (decode); mass: retained top-k routing mass; requests: finished/rejected/"
                  "unfinished; goodput: requests/s meeting the SLO; prefix hit: share of prompt tokens found in "
                  "the prefix cache")


@dataclass(frozen=True)
class SummaryCells:
    """A summary table as text: its headers (the first is the policy's), one row of cells per policy, and the
    legend that explains the headers."""

    headers: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    legend: str


def summary_cells(frame: pd.DataFrame, *, with_slo: bool) -> SummaryCells:
    """One row per policy (``frame``: ``ExperimentResult.summary_frame``, or a run's ``summary.parquet`` indexed
    by policy) with the columns of ``SUMMARY_COLUMNS``, the request counts, ``SLO_COLUMNS`` with an SLO, and
    ``PREFIX_COLUMNS`` where prefixes were found cached."""
    with_prefix = "prefix_hit_rate" in frame and bool((frame["prefix_hit_rate"].fillna(0) > 0).any())
    extra_columns = (*(SLO_COLUMNS if with_slo else ()), *(PREFIX_COLUMNS if with_prefix else ()))
    headers = ("policy", *(h for _, h, _ in SUMMARY_COLUMNS), "requests", *(h for _, h, _ in extra_columns))
    rows = tuple(
        (
            str(label),
            *(format_cell(row[key], fmt) for key, _, fmt in SUMMARY_COLUMNS),
            "/".join(format_cell(row[key], "{:.0f}") for key in REQUESTS_COLUMN),
            *(format_cell(row[key], fmt) for key, _, fmt in extra_columns),
        )
        for label, row in frame.iterrows()
    )
    return SummaryCells(headers, rows, SUMMARY_LEGEND.format(first=frame.index[0]))


def format_cell(value: object, fmt: str) -> str:
    """A table cell: ``value`` in ``fmt``, or "-" where there is none (None or NaN)."""
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else fmt.format(value)
