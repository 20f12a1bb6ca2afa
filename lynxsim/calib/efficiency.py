"""Kernel efficiency of a profile's measured tables: how close each timed unit comes to the least time its work
allows. No torch.

A measured time says how long a unit took, not how well its kernels ran. This module sets every grid point of
every measured table beside the unit's floor on the same GPU:

* bytes: the fewest bytes the unit must move through device memory (each weight and KV-cache byte read once,
  its activations read or written once), and FLOPs, both from ``UnitRooflines.unit_work``, the one statement of
  each unit's work that the cost model's rooflines are computed from too;
* byte floor = bytes / the profile's measured copy bandwidth (``efficiency.sustained_bandwidth_bytes_per_s``);
  FLOP floor = FLOPs / the measured matrix rate of the unit's dtype (``dense_*_flops_per_s * flops_fraction``:
  bf16 for every calibrated model);
* efficiency = max(byte floor, FLOP floor) / measured time, and the fraction of copy bandwidth reached =
  byte floor / measured time.

Both ceilings are themselves measurements (a large copy, a large GEMM), so a kernel can beat a floor by their
margin, or where a few activations stay in L2; efficiencies a little above 1 are that, not an error.

The MoE table's grid point (tokens, distinct experts) was timed at ``feasible_tokens(tokens, distinct, top_k)``
tokens, i.e. that many times top-k token-expert assignments (the grid's small token counts cannot reach many
experts; ``lynxsim.calib.plan``), so its work is counted there (column ``timed_tokens``). An expert-parallel
rank's table (key ``<model>@ep<N>``: ``E / N`` whole experts, as few as one active) was timed with the same
assignments spread over more token rows; its work is counted at the same assignments.

``write_efficiency`` writes ``kernel_efficiency.csv`` (one row per model key, unit and grid point) and
``kernel_efficiency.md`` (the targets below, checked; a summary per unit; the method). ``lynxsim calibrate
--efficiency`` calls it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from lynxsim.calib.plan import feasible_tokens
from lynxsim.calib.profile_io import shown_path
from lynxsim.cost import DIAGNOSTIC_UNITS, MEASURED_UNITS, TableInterpolator, UnitRooflines, table_name
from lynxsim.hardware import HardwareProfile, KernelTable, load_hardware
from lynxsim.models import load_catalog_model
from lynxsim.models.spec import ModelSpec
from lynxsim.parallel import ParallelPlan, shard_model

UNITS = (
    "moe", "attention_decode", "attention_prefill", "dense_layer", "dense_layer_gemms", "dense_ffn_layer",
    "embedding", "lm_head",
)
"""The units whose tables are judged, in report order (``graph_launch`` times a launch, not work)."""

AXIS_COLUMNS = ("tokens", "distinct_experts", "batch", "context_tokens", "chunk_tokens", "sequences")
"""Every table axis, one column each in the rows (NaN where a unit has no such axis)."""

ROW_AXIS = {
    "moe": "tokens", "attention_decode": "batch", "dense_layer": "tokens", "dense_layer_gemms": "tokens",
    "dense_ffn_layer": "tokens", "embedding": "tokens", "lm_head": "sequences",
}
"""The axis that counts a unit's rows (tokens, decode sequences), which sets the decode region."""

DECODE_MAX_ROWS = 64
"""The decode region of a unit: at most this many rows (decode batches of the targets below)."""

BYTES_DOMINATE_FACTOR = 4.0
"""A grid point's bytes dominate where its byte floor is at least this many times its FLOP floor."""

MOE_BANDWIDTH_TARGET = 0.8
"""Target: the MoE unit reaches this fraction of copy bandwidth wherever the active experts' bytes dominate."""

DENSE_GEMMS_RATIO_TARGET = 2.0
"""Target: at 1-64 decode tokens, dense_layer takes at most this many times its GEMMs alone."""

DENSE_LAYER_TARGET_S = {"qwen3-30b-a3b": 45e-6, "mixtral-8x7b": 70e-6}
"""Target: dense_layer at 1-64 decode tokens takes at most this long per layer (one GPU)."""

DENSE_REPORT_TOKENS = (1, 16, 64)
"""Token counts at which the report shows dense_layer and its GEMMs side by side."""

MOE_TARGET_KEYS = ("mixtral-8x7b", "qwen3-30b-a3b", "qwen2-57b-a14b@tp2", "deepseek-coder-v2@tp4")
"""Model keys whose MoE efficiency the target names; the report says which of them the profile lacks."""

_KEY = re.compile(r"^(?P<base>[^@]+)(?:@tp(?P<tp>\d+))?(?:@ep(?P<ep>\d+))?(?:@(?P<dtype>fp8))?$")


def model_for_key(key: str) -> ModelSpec:
    """The shape a table key was calibrated on: the catalog model; one rank's shard of it for ``<model>@tp<G>``
    (``shard_model``); for ``<model>@ep<N>`` (one expert-parallel rank's MoE table) the catalog model itself,
    whose experts an EP rank holds whole; for ``<model>@fp8`` the catalog model with FP8 experts (half the
    expert bytes: ``lynxsim.cost.expert_table_key``)."""
    match = _KEY.match(key)
    if match is None:
        raise ValueError(f"table key {key!r} is not <model>[@tp<G>][@ep<N>][@fp8]")
    model = load_catalog_model(match["base"])
    if match["dtype"]:
        model = ModelSpec.model_validate({**model.model_dump(), "expert_weight_dtype": match["dtype"]})
    tensor_parallel = int(match["tp"] or 1)
    if tensor_parallel > 1:
        return shard_model(model, ParallelPlan(tensor_parallel=tensor_parallel, expert_parallel=int(match["ep"] or 1)))
    return model


def _unit_rows(key: str, unit: str, hardware: HardwareProfile, rooflines: UnitRooflines) -> pd.DataFrame:
    """The rows of one table: its grid points, measured times, work and floors."""
    name = table_name(key, unit)
    table = hardware.measured.tables[name]
    expected = {**MEASURED_UNITS, **DIAGNOSTIC_UNITS}[unit]
    if table.axes != expected:
        raise ValueError(f"table {name} has axes {list(table.axes)}, expected {list(expected)}")
    grid = [g.ravel() for g in np.meshgrid(*[np.asarray(v, dtype=np.float64) for v in table.axis_values],
                                            indexing="ij")]  # row-major, as latency_s is stored
    frame = pd.DataFrame({"model": key, "unit": unit}, index=range(grid[0].size))
    for column in AXIS_COLUMNS:
        frame[column] = np.nan
    for axis, values in zip(table.axes, grid, strict=True):
        frame[axis] = values
    work_axes = list(grid)
    frame["timed_tokens"] = np.nan
    if unit == "moe":
        top_k = rooflines.model.top_k
        work_axes[0] = np.array([feasible_tokens(int(t), int(d), top_k) for t, d in zip(grid[0], grid[1], strict=True)],
                                dtype=np.float64)
        frame["timed_tokens"] = work_axes[0]
    measured_s = np.asarray(table.latency_s, dtype=np.float64)
    work_bytes, flops = rooflines.unit_work(unit)(*work_axes)
    byte_floor_s = work_bytes / hardware.sustained_bandwidth_bytes_per_s
    flop_floor_s = flops / rooflines.unit_flops_per_s(unit)
    floor_s = np.maximum(byte_floor_s, flop_floor_s)
    frame["measured_s"] = measured_s
    frame["bytes"] = work_bytes
    frame["flops"] = flops
    frame["byte_floor_s"] = byte_floor_s
    frame["flop_floor_s"] = flop_floor_s
    frame["floor_s"] = floor_s
    frame["efficiency"] = floor_s / measured_s
    frame["bandwidth_fraction"] = byte_floor_s / measured_s
    frame["bound"] = np.where(byte_floor_s >= flop_floor_s, "bytes", "flops")
    frame["launch_floor_s"] = rooflines.unit_kernels(unit) * hardware.efficiency.kernel_launch_s
    metadata = hardware.measured.metadata_for(name)
    frame["gpu"] = metadata.gpu_name if metadata is not None else ""
    return frame


def efficiency_rows(hardware: HardwareProfile, keys: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per (model key, unit, grid point) of every judged table (``UNITS``) the profile holds for
    ``keys`` (None: every key of the profile): the axes (``AXIS_COLUMNS``), ``timed_tokens`` (MoE: the tokens
    the point was timed at), ``measured_s``, ``bytes``, ``flops``, ``byte_floor_s``, ``flop_floor_s``,
    ``floor_s`` (their maximum), ``efficiency`` (floor / measured), ``bandwidth_fraction`` (byte floor /
    measured), ``bound`` ("bytes" or "flops") and ``gpu`` (the table's calibration run)."""
    chosen = list(keys) if keys is not None else hardware.measured.model_keys()
    frames: list[pd.DataFrame] = []
    for key in chosen:
        units = [u for u in UNITS if table_name(key, u) in hardware.measured.tables]
        if not units:
            raise ValueError(f"hardware profile {hardware.name} has no measured tables of {key}")
        rooflines = UnitRooflines(model_for_key(key), hardware)
        frames.extend(_unit_rows(key, unit, hardware, rooflines) for unit in units)
    return pd.concat(frames, ignore_index=True)


def _bytes_dominated(rows: pd.DataFrame) -> pd.Series:
    """Points whose byte floor is at least ``BYTES_DOMINATE_FACTOR`` times both their FLOP floor and their
    kernels' fixed launch cost: where streaming the bytes, not arithmetic or launching, sets the time."""
    other = np.maximum(rows["flop_floor_s"], rows["launch_floor_s"])
    return rows["byte_floor_s"] >= BYTES_DOMINATE_FACTOR * other


def _decode_region(rows: pd.DataFrame) -> pd.Series:
    """Whether each row lies in its unit's decode region (at most ``DECODE_MAX_ROWS`` rows); never for units
    without a row axis (prefill)."""
    inside = pd.Series(False, index=rows.index)
    for unit, axis in ROW_AXIS.items():
        of_unit = rows["unit"] == unit
        inside |= of_unit & (rows[axis] <= DECODE_MAX_ROWS)
    return inside


def efficiency_summary(rows: pd.DataFrame) -> pd.DataFrame:
    """Per model, unit and region ("all" grid points, and "decode": at most ``DECODE_MAX_ROWS`` rows): points,
    median / min / max efficiency, and among the points whose bytes dominate (``BYTES_DOMINATE_FACTOR``) their
    count, the median and minimum fraction of copy bandwidth reached and the share of them at or above
    ``MOE_BANDWIDTH_TARGET``."""
    decode = _decode_region(rows)
    dominated = _bytes_dominated(rows)
    records = []
    for (model, unit), group in rows.groupby(["model", "unit"], sort=False):
        for region, mask in (("all", pd.Series(True, index=group.index)), ("decode", decode[group.index])):
            part = group[mask]
            if part.empty:
                continue
            fractions = part.loc[dominated[part.index], "bandwidth_fraction"]
            records.append({
                "model": model,
                "unit": unit,
                "region": region,
                "points": len(part),
                "median_efficiency": float(part["efficiency"].median()),
                "min_efficiency": float(part["efficiency"].min()),
                "max_efficiency": float(part["efficiency"].max()),
                "bytes_dominated_points": len(fractions),
                "median_bandwidth_fraction": float(fractions.median()) if len(fractions) else np.nan,
                "min_bandwidth_fraction": float(fractions.min()) if len(fractions) else np.nan,
                "share_at_bandwidth_target": (float((fractions >= MOE_BANDWIDTH_TARGET).mean())
                                              if len(fractions) else np.nan),
            })
    return pd.DataFrame(records)


# ----- the report --------------------------------------------------------------------------------------------------


def _us(seconds: float) -> str:
    return "—" if not np.isfinite(seconds) else f"{seconds * 1e6:.1f}"


def _pct(fraction: float) -> str:
    return "—" if not np.isfinite(fraction) else f"{fraction:.0%}"


def _met(ok: bool | None) -> str:
    return "not checkable" if ok is None else ("met" if ok else "NOT met")


def _times_by_tokens(rows: pd.DataFrame, model: str, unit: str) -> pd.Series:
    part = rows[(rows["model"] == model) & (rows["unit"] == unit)]
    return pd.Series(part["measured_s"].to_numpy(), index=part["tokens"].to_numpy())


def _token_list(tokens: Sequence[float], within: Sequence[float]) -> str:
    """``tokens`` as a list, or "every measured count from a to b" where they are all of ``within``."""
    if list(tokens) == list(within) and len(tokens) > 2:
        return f"every measured count from {within[0]:g} to {within[-1]:g} tokens"
    return ", ".join(f"{t:g}" for t in tokens) + " tokens"


def _dense_section(rows: pd.DataFrame) -> list[str]:
    lines = [
        "## Dense part of a layer against its GEMMs alone",
        "",
        f"Targets, at 1-{DECODE_MAX_ROWS} decode tokens: `dense_layer` (norms, projections, rotary, KV-cache write, "
        f"router, shared experts) within {DENSE_GEMMS_RATIO_TARGET:g}x of `dense_layer_gemms` (its GEMMs alone, timed "
        "the same way), and `dense_layer` at most "
        + " and ".join(f"{_us(s)} us per layer for {k}" for k, s in DENSE_LAYER_TARGET_S.items())
        + ". Times in us per layer.",
        "",
        "| model | " + " | ".join(f"dense_layer {t}" for t in DENSE_REPORT_TOKENS) + " | "
        + " | ".join(f"GEMMs {t}" for t in DENSE_REPORT_TOKENS)
        + f" | ratio at {'/'.join(map(str, DENSE_REPORT_TOKENS))} | worst ratio at 1-{DECODE_MAX_ROWS} | "
        f"slowest dense_layer at 1-{DECODE_MAX_ROWS} | ratio target | absolute target |",
        "|---|" + "---:|" * (2 * len(DENSE_REPORT_TOKENS) + 3) + "---|---|",
    ]
    verdicts, unchecked = [], []
    for model in rows.loc[rows["unit"] == "dense_layer", "model"].unique():
        dense = _times_by_tokens(rows, model, "dense_layer")
        gemms = _times_by_tokens(rows, model, "dense_layer_gemms")
        decode_dense = dense[dense.index <= DECODE_MAX_ROWS]
        common = decode_dense.index.intersection(gemms.index)
        ratios = decode_dense[common] / gemms[common]
        ratio_ok = bool(ratios.max() <= DENSE_GEMMS_RATIO_TARGET) if len(ratios) else None
        slowest = float(decode_dense.max())
        target_s = DENSE_LAYER_TARGET_S.get(model)
        absolute_ok = None if target_s is None else slowest <= target_s
        at = [dense.get(t, np.nan) / gemms.get(t, np.nan) for t in DENSE_REPORT_TOKENS]
        cells = [_us(dense.get(t, np.nan)) for t in DENSE_REPORT_TOKENS]
        cells += [_us(gemms.get(t, np.nan)) for t in DENSE_REPORT_TOKENS]
        cells += [
            " / ".join("—" if not np.isfinite(r) else f"{r:.2f}" for r in at),
            f"{ratios.max():.2f}" if len(ratios) else "—",
            _us(slowest),
            _met(ratio_ok),
            "—" if target_s is None else f"<= {_us(target_s)}: {_met(absolute_ok)}",
        ]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
        if ratio_ok is None:
            unchecked.append(model)
        elif not ratio_ok:
            over = ratios[ratios > DENSE_GEMMS_RATIO_TARGET]
            verdicts.append(f"- {model}: ratio target NOT met: dense_layer takes more than "
                            f"{DENSE_GEMMS_RATIO_TARGET:g}x its GEMMs at {_token_list(over.index, ratios.index)} "
                            f"(worst {ratios.max():.2f}x at {ratios.idxmax():g} tokens).")
        if absolute_ok is False and target_s is not None:
            over = decode_dense[decode_dense > target_s]
            verdicts.append(f"- {model}: absolute target NOT met: dense_layer exceeds {_us(target_s)} us at "
                            f"{_token_list(over.index, decode_dense.index)} (slowest {_us(slowest)} us).")
    if unchecked:
        verdicts.append(f"- The ratio target cannot be checked for {', '.join(unchecked)}: the profile has no "
                        "`<model>/dense_layer_gemms` table for them (calibrate them again to add it).")
    missing = [k for k in DENSE_LAYER_TARGET_S if k not in set(rows.loc[rows["unit"] == "dense_layer", "model"])]
    if missing:
        verdicts.append(f"- No dense_layer table of {', '.join(missing)} in this profile: its absolute target is "
                        "not checked.")
    return lines + ([""] + verdicts if verdicts else []) + [""]


def _moe_point(row: pd.Series) -> str:
    return f"{row['tokens']:g} tokens x {row['distinct_experts']:g} experts: {row['bandwidth_fraction']:.0%}"


def _moe_section(rows: pd.DataFrame, summary: pd.DataFrame, listed: int = 12) -> list[str]:
    lines = [
        "## Routed experts (MoE) against copy bandwidth",
        "",
        f"Target: the MoE unit reaches at least {MOE_BANDWIDTH_TARGET:.0%} of the measured copy bandwidth wherever "
        "the active experts' bytes dominate. A grid point's bytes *dominate* where its byte floor is at least "
        f"{BYTES_DOMINATE_FACTOR:g}x both its FLOP floor and its kernels' fixed launch cost (the unit's "
        "weight-streaming kernels times the profile's measured `kernel_launch_s`; below that a handful of experts "
        "is read in the time the launches take); the fraction of copy bandwidth reached is byte floor / "
        f"measured time. The decode region is tokens <= {DECODE_MAX_ROWS}.",
        "",
        "| model | bytes-dominated points | median fraction | min fraction | share >= target | "
        f"of them at <= {DECODE_MAX_ROWS} tokens | median there | min there | share there | target |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    moe = summary[summary["unit"] == "moe"].set_index(["model", "region"])
    dominated = rows[(rows["unit"] == "moe") & _bytes_dominated(rows)]
    verdicts = []
    for model in rows.loc[rows["unit"] == "moe", "model"].unique():
        cells = []
        for region in ("all", "decode"):
            if (model, region) in moe.index:
                s = moe.loc[(model, region)]
                cells += [str(int(s["bytes_dominated_points"])), _pct(s["median_bandwidth_fraction"]),
                          _pct(s["min_bandwidth_fraction"]), _pct(s["share_at_bandwidth_target"])]
            else:
                cells += ["0", "—", "—", "—"]
        points = dominated[dominated["model"] == model]
        failing = points[points["bandwidth_fraction"] < MOE_BANDWIDTH_TARGET].sort_values("bandwidth_fraction")
        ok = None if points.empty else failing.empty
        cells.append(_met(ok))
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
        if not failing.empty:
            in_decode = int((failing["tokens"] <= DECODE_MAX_ROWS).sum())
            shown = "; ".join(_moe_point(r) for _, r in failing.head(listed).iterrows())
            more = f"; {len(failing) - listed} more in kernel_efficiency.csv" if len(failing) > listed else ""
            verdicts.append(f"- {model}: NOT met at {len(failing)} of {len(points)} bytes-dominated points "
                            f"({in_decode} of them at <= {DECODE_MAX_ROWS} tokens), worst first: {shown}{more}.")
    lines += ["", *_router_like_table(dominated)]
    missing = [k for k in MOE_TARGET_KEYS if k not in set(rows.loc[rows["unit"] == "moe", "model"])]
    if missing:
        verdicts.append(f"- Not in this profile, so not reported: {', '.join(missing)} (calibrate them to add them).")
    return lines + ([""] + verdicts if verdicts else []) + [""]


def _router_like(points: pd.DataFrame) -> pd.Series:
    """Whether each MoE point activates at least as many experts as its tokens typically do under uniform top-k
    routing (``_typical_distinct``): the points a decode batch's layers price. The grid also holds points of
    many tokens over few experts (every token routed into the same handful), which no trained router produces
    and which the kernel serves with few programs per expert."""
    models = {key: model_for_key(str(key)) for key in points["model"].unique()}
    typical = [
        _typical_distinct(models[m], max(1, int(t)))
        for m, t in zip(points["model"], points["tokens"], strict=True)
    ]
    return points["distinct_experts"] >= np.asarray(typical, dtype=np.float64)


def _router_like_table(dominated: pd.DataFrame) -> list[str]:
    """The bytes-dominated MoE points that a router's routing reaches (``_router_like``), per model."""
    lines = [
        "The same target over the bytes-dominated points a router's routing reaches: at least as many distinct "
        "experts as that many tokens activate under uniform top-k routing (the points a decode batch prices; "
        "the rest of the grid routes many tokens into a few experts).",
        "",
        "| model | router-like points | median fraction | min fraction | share >= target | target there |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for model, group in dominated.groupby("model", sort=True):
        part = group[_router_like(group)]
        if part.empty:
            continue
        fractions = part["bandwidth_fraction"]
        lines.append(f"| {model} | {len(part)} | {_pct(fractions.median())} | {_pct(fractions.min())} | "
                     f"{_pct(float((fractions >= MOE_BANDWIDTH_TARGET).mean()))} | "
                     f"{_met(bool((fractions >= MOE_BANDWIDTH_TARGET).all()))} |")
    return lines


def _unit_summary_table(summary: pd.DataFrame, units: Sequence[str]) -> list[str]:
    lines = [
        "| model | unit | region | points | median efficiency | min | max | bytes-dominated points | "
        "median fraction of copy bandwidth | min |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for _, s in summary[summary["unit"].isin(units)].iterrows():
        lines.append(
            f"| {s['model']} | {s['unit']} | {s['region']} | {int(s['points'])} | {_pct(s['median_efficiency'])} | "
            f"{_pct(s['min_efficiency'])} | {_pct(s['max_efficiency'])} | {int(s['bytes_dominated_points'])} | "
            f"{_pct(s['median_bandwidth_fraction'])} | {_pct(s['min_bandwidth_fraction'])} |"
        )
    return lines


def _method_section(rows: pd.DataFrame, hardware: HardwareProfile) -> list[str]:
    bandwidth_source = hardware.sources.get("efficiency.sustained_bandwidth_bytes_per_s",
                                            "not measured on this GPU: the H200's measured share of the datasheet")
    flops_source = hardware.sources.get("efficiency.flops_fraction", "not measured on this GPU: the default fraction")
    flops_rate = hardware.sustained_flops_per_s("bf16")
    lines = [
        "## Method",
        "",
        "Per grid point of every table, with the unit's work stated once in `lynxsim.cost.UnitRooflines` "
        "(`unit_work`; the cost model's rooflines are computed from the same statement):",
        "",
        "- efficiency = max(byte floor, FLOP floor) / measured time; fraction of copy bandwidth = byte floor / "
        "measured time;",
        f"- byte floor = bytes / {hardware.sustained_bandwidth_bytes_per_s:.3g} B/s, the measured copy bandwidth "
        f"(`efficiency.sustained_bandwidth_bytes_per_s`: {bandwidth_source});",
        "- FLOP floor = FLOPs / the measured matrix rate of the unit's dtype; for bf16 (every calibrated model) "
        f"{flops_rate / 1e12:.0f} TFLOP/s = `dense_bf16_flops_per_s` x `efficiency.flops_fraction` = "
        f"{hardware.dense_bf16_flops_per_s / 1e12:.1f}e12 x {hardware.efficiency.flops_fraction:g} ({flops_source});",
        "- bytes = the fewest a unit must move through device memory: each weight and KV-cache byte read once, the "
        "unit's activations (bf16) read or written once. Per call, with H heads (one rank's), hidden size h:",
        "  - `moe`(T tokens, d experts): d x expert weights + 2 T h x 2 B; FLOPs 2 x expert params x T x top-k, "
        "at the tokens the point was timed at (`timed_tokens` = `feasible_tokens`(T, d, top-k));",
        "  - `attention_decode`(B rows, C context): B C x KV bytes per token + B H (qk dim + v dim) x 2 B (q in, "
        "output out); FLOPs B C x 2 H (qk dim + v dim); MLA (absorbed): KV = the latent (kv_lora_rank + rope "
        "dims), the kv_b weights read once, FLOPs B C x 2 H (2 kv_lora_rank + rope dims) + 2 B H kv_lora_rank "
        "(nope dim + v dim) for q_nope's absorption and the output's un-absorption;",
        "  - `attention_prefill`(T chunk, C context): (C + T) x KV bytes per token + T H (qk dim + v dim) x 2 B; "
        "FLOPs T (C + (T + 1) / 2) x 2 H (qk dim + v dim) (causal pairs); MLA: plus the kv_b weights and "
        "2 (C + T) kv_lora_rank H (nope dim + v dim) FLOPs decompressing every attended latent;",
        "  - `dense_layer`, `dense_layer_gemms`, `dense_ffn_layer`(T): the weights of the attention projections "
        "(MLA: all but kv_b), router and shared experts (or the dense FFN) + T [(2 h + H qk dim + H v dim) x 2 B "
        "+ KV bytes per token] (the stream row in and out, q out, the attention output in, the new KV entry); "
        "FLOPs 2 x those weights x T;",
        "  - `embedding`(T): T h x (weight bytes + 2 B) (rows read and written) + 8 B token ids; no FLOPs;",
        "  - `lm_head`(S): vocab x h weights + S (h x 2 B + 8 B token id); FLOPs 2 vocab h S;",
        "- kernel launches are not part of a floor: a unit made of many small kernels shows them as lost efficiency.",
        "",
    ]
    mla = [key for key in rows["model"].unique() if model_for_key(key).attention.is_mla]
    if mla:
        lines += [
            f"MLA models ({', '.join(mla)}) are judged against the work of real MLA kernels, kv_b inside the "
            "attention units. A table timed with the reference kernel set (`lynxsim calibrate --kernels "
            "reference`, which approximates MLA by one-KV-head attention with the latent's bytes per token and "
            "reads kv_b's weights in `dense_layer`'s QKV projection) did other work in those two units: their "
            "efficiencies there are not comparable.",
            "",
        ]
    lines += [
        "Each measured time is the median of CUDA-graph replays, with weight copies (and KV caches) rotated within "
        "the graph so that no replay finds its operands in L2 (`lynxsim calibrate`, lynxsim/calib/timing.py). The "
        "calibration runs behind the tables:",
        "",
    ]
    for model in rows["model"].unique():
        metadata = hardware.measured.metadata_for(table_name(model, rows.loc[rows["model"] == model, "unit"].iloc[0]))
        if metadata is None:
            continue
        notes = f"; {metadata.notes}" if metadata.notes else ""
        lines.append(f"- {model}: {metadata.gpu_name}, torch {metadata.torch_version}, CUDA {metadata.cuda_version}, "
                     f"{metadata.date}{notes}")
    return lines + [""]


def efficiency_markdown(rows: pd.DataFrame, summary: pd.DataFrame, *, hardware: HardwareProfile,
                        profile_label: str = "the hardware profile") -> str:
    """The report: the dense-layer and MoE targets checked (met / not met, and where not), attention decode and
    LM head summaries, every unit's summary, and the method with the profile's measured ceilings and sources."""
    above = rows[rows["efficiency"] > 1.0]
    lines = [
        "# Kernel efficiency of the measured tables",
        "",
        f"Generated by `lynxsim calibrate --efficiency` from {profile_label} ({hardware.name}; tables measured on "
        f"{', '.join(sorted(set(rows['gpu'])))}). Every grid point of every table is a row of "
        "[kernel_efficiency.csv](kernel_efficiency.csv): measured time, bytes, FLOPs, byte and FLOP floors, "
        "efficiency = max(floors) / measured time. The method is at the end.",
        "",
    ]
    lines += _dense_section(rows)
    lines += _moe_section(rows, summary)
    lines += ["## Attention decode and LM head", ""]
    lines += _unit_summary_table(summary, ("attention_decode", "lm_head"))
    lines += ["", "## Other units", ""]
    lines += _unit_summary_table(summary, [u for u in UNITS if u not in ("attention_decode", "lm_head")])
    lines += [
        "",
        f"{len(above)} of {len(rows)} grid points run faster than their floor (efficiency above 100%, at most "
        f"{rows['efficiency'].max():.0%}): the floors are measured ceilings, which a kernel can beat by their "
        "margin or where a few operands stay in L2." if len(above) else
        f"No grid point runs faster than its floor (the highest efficiency is {rows['efficiency'].max():.0%}).",
        "",
    ]
    lines += _method_section(rows, hardware)
    return "\n".join(lines)


COMPARED_COUNTS = (1, 16, 64)
"""Token counts (decode batch sizes) at which ``kernel_set_comparison`` sets two table sets side by side."""
COMPARED_CONTEXT_TOKENS = 1024
"""The context of every decode row in that comparison's attention column."""


def _typical_distinct(model: ModelSpec, tokens: int) -> int:
    """Distinct experts that ``tokens`` tokens activate when each picks its top-k uniformly at random:
    ``E (1 - (1 - k / E)^tokens)``, the MoE point a decode batch of that size typically prices."""
    e, k = model.num_experts, model.top_k
    return int(round(e * (1.0 - (1.0 - k / e) ** tokens)))


def kernel_set_comparison(current: dict[str, KernelTable], earlier: dict[str, KernelTable],
                          rooflines_for: Callable[[str], UnitRooflines]) -> pd.DataFrame:
    """Per model key both table sets hold and per count in ``COMPARED_COUNTS``: ``dense_layer``, decode
    attention (that many rows at ``COMPARED_CONTEXT_TOKENS``), ``moe`` (that many tokens over their typical
    distinct experts) and ``lm_head`` (that many sequences), in seconds per layer (per iteration for the LM
    head), from each set, interpolated as the cost model does."""
    rows = []
    keys = sorted({n.split("/", 1)[0] for n in current} & {n.split("/", 1)[0] for n in earlier})
    for key in keys:
        if all(current[n] == earlier.get(n) for n in current if n.startswith(f"{key}/")):
            continue  # the very same tables: nothing to compare
        model = model_for_key(key)
        rooflines = rooflines_for(key)
        for count in COMPARED_COUNTS:
            points = {"dense_layer": (count,), "attention_decode": (count, COMPARED_CONTEXT_TOKENS),
                      "moe": (count, _typical_distinct(model, count)), "lm_head": (count,)}
            for unit, point in points.items():
                name = table_name(key, unit)
                if name not in current or name not in earlier:
                    continue
                roofline = rooflines.unit_roofline(unit)
                now = TableInterpolator(current[name], roofline).scalar(*point)
                before = TableInterpolator(earlier[name], roofline).scalar(*point)
                rows.append({"model": key, "unit": unit, "count": count, "point": point, "earlier_s": before,
                             "current_s": now, "ratio": now / before})
    return pd.DataFrame(rows)


def comparison_markdown(frame: pd.DataFrame, earlier_label: str) -> list[str]:
    """The comparison as a markdown section (empty where no model key is in both sets)."""
    if frame.empty:
        return []
    lines = [
        "## Production kernels against the reference kernels",
        "",
        f"The same units timed with the production kernel set (this profile) and with the reference set "
        f"({earlier_label}: the first, unfused torch path, `lynxsim calibrate --kernels reference`), both on the "
        f"H200, at decode batches of {', '.join(str(c) for c in COMPARED_COUNTS)}: the dense part of one layer, "
        f"one layer's decode attention over {COMPARED_CONTEXT_TOKENS} tokens of context per row, one MoE layer over "
        "the distinct experts that many tokens typically activate (uniform top-k routing), and the LM head. "
        "Microseconds; ratio = production / reference. MLA models' reference attention is the single-KV-head "
        "stand-in, and its dense part held the latent up-projection that production runs in attention.",
        "",
        "| model | unit | " + " | ".join(f"{c}: reference | {c}: production | {c}: ratio" for c in COMPARED_COUNTS)
        + " |",
        "|---|---|" + "---:|---:|---:|" * len(COMPARED_COUNTS),
    ]
    for (model, unit), group in frame.groupby(["model", "unit"], sort=True):
        cells = []
        by_count = {int(r["count"]): r for _, r in group.iterrows()}
        for count in COMPARED_COUNTS:
            r = by_count.get(count)
            cells += (["—"] * 3 if r is None else
                      [_us(r["earlier_s"]), _us(r["current_s"]), f"{r['ratio']:.2f}"])
        lines.append(f"| {model} | {unit} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def write_efficiency(profile_path: Path, keys: Sequence[str] | None, out_dir: Path,
                     reference_tables: Path | None = None) -> tuple[Path, Path]:
    """Write ``kernel_efficiency.csv`` and ``kernel_efficiency.md`` into ``out_dir`` for the tables of ``keys``
    (None: every model key) in the profile at ``profile_path``; returns both paths. ``reference_tables``: a
    folder of table files timed with another kernel set on the same GPU (``--kernels reference``), compared
    unit by unit in the report."""
    from lynxsim.calib.profile_io import read_table_file

    hardware = load_hardware(profile_path)
    rows = efficiency_rows(hardware, keys)
    summary = efficiency_summary(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / "kernel_efficiency.csv"
    md_path = out_dir / "kernel_efficiency.md"
    rows.to_csv(csv_path, index=False, float_format="%.6g")
    label = f"`{shown_path(profile_path)}`"
    text = efficiency_markdown(rows, summary, hardware=hardware, profile_label=label)
    if reference_tables is not None:
        earlier: dict[str, KernelTable] = {}
        for path in sorted(reference_tables.glob("*.yaml")):
            earlier.update(read_table_file(path)[2])
        comparison = kernel_set_comparison(hardware.measured.tables, earlier,
                                           lambda key: UnitRooflines(model_for_key(key), hardware))
        section = comparison_markdown(comparison, f"`{shown_path(reference_tables)}`")
        head, method = text.split("\n## Method", 1) if "\n## Method" in text else (text, "")
        text = head + "\n".join(section) + ("\n## Method" + method if method else "")
    md_path.write_text(text + "\n", encoding="utf-8")
    return csv_path, md_path
