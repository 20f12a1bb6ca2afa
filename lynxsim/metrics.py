"""Per-request and per-iteration records, and the summary statistics computed from them.

Records are kept in preallocated numpy columns while the simulation runs (the compiled engine's arrays: recording
a row must cost next to nothing in the hot loop) and become pandas DataFrames once at the end; the summary is
computed from those frames only, so anything it reports can be recomputed by a user from the parquet files.

The per-layer columns of the iteration table (``PER_LAYER_COLUMNS``) are Arrow list columns (``pd.ArrowDtype``)
over the log's 2-D arrays rather than one numpy array per row: a long run has ~10^5 rows, and making, filtering,
stacking and converting (for parquet) that many small arrays was most of the time a run spent on its records.
``per_layer`` gives such a column back as ``[rows, layers]``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

BREAKDOWN_COLUMNS = ("attention_s", "dense_s", "moe_s", "communication_s", "overhead_s")
PROXY_COLUMNS = ("retained_mass", "top1_kept", "assignments_changed", "assignments_dropped")
PER_LAYER_COLUMNS = ("distinct_experts", *PROXY_COLUMNS)
"""The iteration table's columns holding one value per MoE layer (Arrow list columns, see the module's note)."""


SCALAR_COLUMNS: dict[str, type] = {
    "start_s": np.float64,
    "latency_s": np.float64,
    "prefill_tokens": np.int64,
    "decode_tokens": np.int64,
    "sequences": np.int64,
    "sampled_tokens": np.int64,
    "policy_applied": np.bool_,
    "kv_used_fraction": np.float64,
    **{name: np.float64 for name in (*BREAKDOWN_COLUMNS, "total_s")},
}
"""The per-iteration table's scalar columns, in order, with their types."""

OFFLOAD_COLUMNS: dict[str, type] = {"offload_s": np.float64, "experts_fetched": np.int64}
"""Expert offloading's columns, after the scalar ones in a run that offloads (``lynxsim.engine.offloading``): the
part of ``latency_s`` spent waiting for experts' weights from host memory (the breakdown's sixth part: ``total_s``
is the five of ``BREAKDOWN_COLUMNS`` plus it), and the experts fetched over every MoE layer."""


class IterationLog:
    """The per-iteration table of one serving instance, as numpy columns (one array per column) rather than
    per-row Python objects; the instance's index and role become constant columns in ``frame`` (nothing per row
    while the simulation runs). Made by ``from_columns`` from the rows the compiled engine recorded; a new log
    holds no rows."""

    def __init__(self, num_moe_layers: int, *, instance: int = 0, role: str = "colocated") -> None:
        self.num_moe_layers = num_moe_layers
        self.instance = instance
        self.role = role
        self.rows = 0
        self._scalars: dict[str, np.ndarray] = {
            name: np.zeros(0, dtype=dtype) for name, dtype in SCALAR_COLUMNS.items()
        }
        self._distinct = np.zeros((0, num_moe_layers), dtype=np.int16)  # distinct experts per layer
        self._proxies = np.zeros((len(PROXY_COLUMNS), 0, num_moe_layers), dtype=np.float32)
        self._offload: dict[str, np.ndarray] | None = None

    @classmethod
    def from_columns(
        cls,
        num_moe_layers: int,
        scalars: dict[str, np.ndarray],
        distinct_experts: np.ndarray,
        proxies: np.ndarray,
        *,
        instance: int = 0,
        role: str = "colocated",
        offload: dict[str, np.ndarray] | None = None,
    ) -> IterationLog:
        """A log holding rows recorded elsewhere (the compiled engine's): ``scalars`` every one of
        ``SCALAR_COLUMNS`` in its type, ``distinct_experts`` ``[rows, layers]`` int16, ``proxies`` ``[4, rows,
        layers]`` float32, ``offload`` (a run that offloads experts) every one of ``OFFLOAD_COLUMNS``, all exactly
        ``rows`` long. The log takes them over (``frame`` shares their memory rather than copying it)."""
        if list(scalars) != list(SCALAR_COLUMNS):
            raise ValueError(f"scalar columns {list(scalars)}, expected {list(SCALAR_COLUMNS)}")
        if offload is not None and list(offload) != list(OFFLOAD_COLUMNS):
            raise ValueError(f"offloading columns {list(offload)}, expected {list(OFFLOAD_COLUMNS)}")
        log = cls(num_moe_layers, instance=instance, role=role)
        log.rows = int(distinct_experts.shape[0])
        log._scalars = scalars
        log._distinct = distinct_experts
        log._proxies = proxies
        log._offload = offload
        return log

    @staticmethod
    def _own(array: np.ndarray) -> np.ndarray:
        """The array ``frame`` puts in the table for a part of a column: the part itself (its memory shared)."""
        return array

    def frame(self) -> pd.DataFrame:
        """One row per iteration; ``distinct_experts`` and the proxies hold one value per MoE layer, as Arrow
        lists (``list<int16>`` and ``list<float>``) over the log's 2-D arrays (``_own``)."""
        n = self.rows
        if not n:
            return pd.DataFrame()
        own = self._own
        columns: dict[str, np.ndarray | pd.Series | pd.arrays.ArrowExtensionArray] = {
            name: own(column[:n]) for name, column in self._scalars.items()
        }
        for name, column in (self._offload or {}).items():
            columns[name] = own(column[:n])
        columns["instance"] = np.full(n, self.instance, dtype=np.int64)
        columns["role"] = pd.Series([self.role] * n, dtype=object)
        columns["pure_decode"] = columns["prefill_tokens"] == 0
        distinct = own(self._distinct[:n])
        columns["mean_distinct_experts"] = distinct.mean(axis=1)
        columns["distinct_experts"] = _list_column(distinct)
        for k, name in enumerate(PROXY_COLUMNS):
            values = own(self._proxies[k, :n])
            columns[f"mean_{name}"] = values.mean(axis=1)
            columns[name] = _list_column(values)
        return pd.DataFrame(columns, copy=False)


ARROW_LIST_MAX_VALUES = np.iinfo(np.int32).max
"""An Arrow list array addresses its values with int32 offsets: a longer column is split into chunks."""


def _list_column(values: np.ndarray) -> pd.arrays.ArrowExtensionArray:
    """``values`` ``[rows, layers]`` as an Arrow list column sharing its memory (no per-row object is made), of
    the element type the records files have always had (``list<int16>``, ``list<float>``)."""
    rows, layers = values.shape
    flat = values.reshape(-1)
    rows_per_chunk = ARROW_LIST_MAX_VALUES // max(layers, 1)
    chunks = []
    for first in range(0, rows, rows_per_chunk):
        count = min(rows_per_chunk, rows - first)
        offsets = np.arange(count + 1, dtype=np.int32) * np.int32(layers)
        chunk_values = flat[first * layers : (first + count) * layers]
        chunks.append(pa.ListArray.from_arrays(pa.array(offsets), pa.array(chunk_values)))
    return pd.arrays.ArrowExtensionArray(pa.chunked_array(chunks, type=pa.list_(pa.from_numpy_dtype(values.dtype))))


def per_layer(column: pd.Series) -> np.ndarray:
    """A per-layer column of an iteration table as ``[rows, layers]`` (``rows`` at least one). The Arrow list
    columns of ``IterationLog.frame`` give their values without per-row work; a column of one array per row
    (what ``pandas.read_parquet`` returns for a records file) is stacked."""
    if isinstance(column.dtype, pd.ArrowDtype):
        flat = [chunk.flatten().to_numpy() for chunk in pa.chunked_array(column).chunks]
        return (flat[0] if len(flat) == 1 else np.concatenate(flat)).reshape(len(column), -1)  # one chunk: a view
    return np.stack(column.to_numpy())


def request_table(
    *,
    request_id: np.ndarray,
    arrival_s: np.ndarray,
    prompt_tokens: np.ndarray,
    output_tokens: np.ndarray,
    generated_tokens: np.ndarray,
    first_scheduled_s: np.ndarray,
    first_token_s: np.ndarray,
    finish_s: np.ndarray,
    preemptions: np.ndarray,
    cached_tokens: np.ndarray,
    instance: np.ndarray,
    decode_instance: np.ndarray,
    transfer_start_s: np.ndarray,
    transfer_end_s: np.ndarray,
    status: list[str],
) -> pd.DataFrame:
    """One row per arrived request, from per-request columns (times NaN where a request never got there).
    ``status`` is ``finished``, or why it did not finish. ``instance`` is the instance the router gave it (-1:
    rejected), which computed its prompt: ``prefill_instance`` is the same; ``decode_instance`` is the one that
    generated its other tokens (co-located: the same again; disaggregated: -1 until one was chosen).
    ``transfer_wait_s`` is the wait from its first token to the start of its KV-cache transfer (for KV blocks on
    the decode instance), ``transfer_s`` the transfer itself (NaN: none). ``cached_tokens``: the prompt tokens
    its first admission found in the prefix cache, not computed (vLLM's ``num_cached_tokens``; 0 without prefix
    caching)."""
    decode_steps = (generated_tokens - 1).astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        tpot = np.where(decode_steps > 0, (finish_s - first_token_s) / decode_steps, np.nan)
    return pd.DataFrame(
        {
            "request_id": request_id,
            "arrival_s": arrival_s,
            "prompt_tokens": prompt_tokens,
            "output_tokens": output_tokens,
            "generated_tokens": generated_tokens,
            "first_token_s": first_token_s,
            "finish_s": finish_s,
            "scheduling_delay_s": first_scheduled_s - arrival_s,
            "ttft_s": first_token_s - arrival_s,
            "tpot_s": tpot,
            "e2e_s": finish_s - arrival_s,
            "preemptions": preemptions,
            "cached_tokens": cached_tokens,
            "instance": instance,
            "prefill_instance": instance,
            "decode_instance": decode_instance,
            "transfer_wait_s": transfer_start_s - first_token_s,
            "transfer_s": transfer_end_s - transfer_start_s,
            "status": pd.Series(status, dtype=object),
        }
    )


def _percentile(values: pd.Series, q: float) -> float:
    """The q-th percentile (the nearest value at or above it, so that an infinite value stays infinite rather than
    interpolating to NaN); a request never scheduled waits forever."""
    filled = values.fillna(np.inf).to_numpy()
    return float(np.percentile(filled, q, method="higher")) if len(filled) else np.nan


def slo_met(requests: pd.DataFrame, *, ttft_slo_s: float | None, tpot_slo_s: float | None) -> pd.Series:
    """Per request: finished, with TTFT and TPOT within their targets (a target not set always holds; a
    one-token output has no TPOT and meets any TPOT target). Unfinished requests never meet an SLO."""
    met = requests["status"] == "finished"
    if ttft_slo_s is not None:
        met &= requests["ttft_s"] <= ttft_slo_s
    if tpot_slo_s is not None:
        met &= requests["tpot_s"].isna() | (requests["tpot_s"] <= tpot_slo_s)
    return met


def summarize(
    requests: pd.DataFrame,
    iterations: pd.DataFrame,
    *,
    warmup_s: float,
    end_s: float,
    ttft_slo_s: float | None = None,
    tpot_slo_s: float | None = None,
) -> dict[str, float]:
    """Headline numbers of one run. Latency percentiles cover finished requests that arrived after warm-up;
    throughput counts tokens sampled by iterations that started after warm-up; the routing figures (distinct
    experts, quality proxies) average pure-decode iterations, where a decode-only policy acts. SLO attainment is
    the share of requests arrived after warm-up that met every target (unfinished ones count as misses), and
    goodput the rate of such requests over the measured window."""
    measured = requests[(requests["arrival_s"] >= warmup_s) & (requests["status"] == "finished")]
    window_s = max(end_s - warmup_s, 1e-12)
    after_warmup = requests[requests["arrival_s"] >= warmup_s]
    met = slo_met(after_warmup, ttft_slo_s=ttft_slo_s, tpot_slo_s=tpot_slo_s)
    # a handful of distinct statuses over ~10^4 requests: each is tested for a prefix once, not once per request
    status_counts = requests["status"].value_counts()
    summary: dict[str, float] = {
        "requests_arrived": float(len(requests)),
        "requests_finished": float((requests["status"] == "finished").sum()),
        "requests_unfinished": float(sum(n for status, n in status_counts.items() if status.startswith("cutoff"))),
        "requests_rejected": float(sum(n for status, n in status_counts.items() if status.startswith("rejected"))),
        "requests_measured": float(len(measured)),
        "preemptions": float(requests["preemptions"].sum()),
        "simulated_s": end_s,
        "slo_attainment": float(met.mean()) if len(met) else np.nan,
        "scheduling_delay_p99_s": _percentile(after_warmup["scheduling_delay_s"], 99),
        "goodput_rps": float(met.sum()) / window_s,
    }
    # prefix caching: the share of prompt tokens that requests scheduled after warm-up found cached, and those tokens
    scheduled = after_warmup[after_warmup["scheduling_delay_s"].notna()]
    cached = float(scheduled["cached_tokens"].sum())
    prompts = float(scheduled["prompt_tokens"].sum())
    summary["prefix_hit_rate"] = cached / prompts if prompts else np.nan
    summary["prefill_tokens_saved"] = cached
    # disaggregated serving: KV-cache transfers of requests arrived after warm-up (NaN when there were none)
    for key, column in (("transfer_mean_ms", "transfer_s"), ("transfer_wait_mean_ms", "transfer_wait_s")):
        values = after_warmup[column].dropna().to_numpy() if column in after_warmup else np.zeros(0)
        summary[key] = float(values.mean()) * 1e3 if len(values) else np.nan
    for metric, scale, unit in (("ttft", 1e3, "ms"), ("tpot", 1e3, "ms"), ("e2e", 1.0, "s")):
        values = measured[f"{metric}_s"].dropna().to_numpy() * scale
        for q in (50, 90, 99):
            summary[f"{metric}_p{q}_{unit}"] = float(np.percentile(values, q)) if len(values) else np.nan
        summary[f"{metric}_mean_{unit}"] = float(values.mean()) if len(values) else np.nan
    # filtering copies every column kept: keep only those read below (not the per-layer lists, most of the table)
    read = ("start_s", "sampled_tokens", "pure_decode", "decode_tokens", "prefill_tokens", "policy_applied",
            "mean_distinct_experts", *(f"mean_{name}" for name in PROXY_COLUMNS), "latency_s", *OFFLOAD_COLUMNS)
    iterations = iterations[[name for name in read if name in iterations.columns]]
    window = iterations[iterations["start_s"] >= warmup_s] if not iterations.empty else iterations
    summary["output_tokens_per_s"] = float(window["sampled_tokens"].sum()) / window_s if len(window) else 0.0
    summary["iterations"] = float(len(window))
    decode = window[window["pure_decode"]] if len(window) else window
    summary["pure_decode_fraction"] = len(decode) / len(window) if len(window) else np.nan
    summary["mean_decode_batch"] = float(decode["decode_tokens"].mean()) if len(decode) else np.nan
    summary["mean_distinct_experts"] = float(decode["mean_distinct_experts"].mean()) if len(decode) else np.nan
    summary["mean_distinct_experts_all"] = float(window["mean_distinct_experts"].mean()) if len(window) else np.nan
    if "offload_s" in window:  # expert offloading: the share of GPU time spent waiting for experts' weights
        summary.update(offload_summary(window, decode))
    applied = window[window["policy_applied"]] if len(window) else window
    tokens = applied["prefill_tokens"] + applied["decode_tokens"] if len(applied) else None
    for name in PROXY_COLUMNS:
        if tokens is None or tokens.sum() == 0:
            summary[name] = np.nan
        else:
            summary[name] = float(np.average(applied[f"mean_{name}"], weights=tokens))
    return summary


def offload_summary(window: pd.DataFrame, decode: pd.DataFrame) -> dict[str, float]:
    """Expert offloading's figures over the measured iterations (``window``) and their pure-decode ones
    (``decode``): the share of iteration time that waited for fetches (``offload_share``, of all of them;
    ``offload_share_decode``), the mean wait per decode iteration and the experts fetched per iteration."""
    def share(frame: pd.DataFrame) -> float:
        busy = float(frame["latency_s"].sum()) if len(frame) else 0.0
        return float(frame["offload_s"].sum()) / busy if busy > 0 else np.nan

    return {
        "offload_share": share(window),
        "offload_share_decode": share(decode),
        "offload_decode_mean_ms": float(decode["offload_s"].mean()) * 1e3 if len(decode) else np.nan,
        "experts_fetched_per_iteration": float(window["experts_fetched"].mean()) if len(window) else np.nan,
        "experts_fetched_per_decode_iteration": float(decode["experts_fetched"].mean()) if len(decode) else np.nan,
    }


def layer_summary(iterations: pd.DataFrame, *, warmup_s: float) -> pd.DataFrame:
    """Per MoE layer: mean distinct experts over pure-decode iterations and the token-weighted quality proxies
    over the iterations the policy ran on (both after warm-up), so a user sees which layers a policy changes."""
    if not len(iterations):
        return pd.DataFrame()
    window = (iterations["start_s"] >= warmup_s).to_numpy()
    if not window.any():
        return pd.DataFrame()
    decode = window & iterations["pure_decode"].to_numpy(dtype=bool)
    distinct = per_layer(iterations["distinct_experts"])
    frame = pd.DataFrame({"moe_layer": np.arange(distinct.shape[1])})
    frame["mean_distinct_experts"] = distinct[decode].mean(axis=0) if decode.any() else np.nan
    applied = window & iterations["policy_applied"].to_numpy(dtype=bool)
    tokens = (iterations["prefill_tokens"] + iterations["decode_tokens"]).to_numpy(dtype=float)[applied]
    for name in PROXY_COLUMNS:
        if tokens.sum() > 0:
            frame[name] = np.average(per_layer(iterations[name])[applied], axis=0, weights=tokens)
        else:
            frame[name] = np.nan
    return frame
