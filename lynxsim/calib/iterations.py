"""The iterations that validation executes: taken from real simulated runs, chosen, and priced. No torch.

Validation needs, per iteration, what the iteration records on disk do not hold: every decode row's context
length, every prefill chunk with its cached context, and each MoE layer's tokens per expert as the policy chose
them. Rather than grow every run's records for that, validation runs its simulations in-process (lynxsim runs
anywhere, the GPU machine's CPU included) through the ordinary runner, with the run's cost model wrapped by
``RecordingCostModel``, which keeps exactly the arguments the engine prices each iteration with (the
``BatchShape`` and the ``[moe_layers, experts]`` expert token counts, as int16) next to the predicted latency.
Those arguments are then the executed iteration: nothing is reconstructed.

The validation workload (``validation_config``) is built so that one run passes through every decode batch from
256 down to 1 and through mixed prefill/decode iterations: 256 requests arrive at once, prompts of 32..512
tokens (chunked prefill of 2048 tokens per iteration, so the first iterations mix prefill chunks with the first
decodes), outputs of 8..512 tokens (so the decode batch shrinks one request at a time). ``select_iterations``
then picks decode iterations at the batch sizes of ``DECODE_BATCH_TARGETS`` and a few mixed ones.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lynxsim.config import ExperimentConfig
from lynxsim.cost import CostModel
from lynxsim.datatypes import BatchShape, ExpertActivity, LatencyBreakdown

if TYPE_CHECKING:
    from lynxsim.instance_cost import InstanceCostModel

DECODE_BATCH_TARGETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)
MIXED_ITERATIONS = 4
VALIDATION_REQUESTS = 256


@dataclass(frozen=True)
class _RecordedActivity(ExpertActivity):
    """An iteration's expert activity with the tokens per expert it was computed from."""

    counts: np.ndarray | None = None


class RecordingCostModel:
    """Wraps a cost model; every iteration it prices is priced by the wrapped model and recorded with the tokens
    per expert its activity came from."""

    needs_expert_counts = True  # validation executes each expert's recorded tokens

    def __init__(self, inner: InstanceCostModel) -> None:
        self.inner = inner
        self.records: list[tuple[BatchShape, np.ndarray, LatencyBreakdown]] = []

    def activity(self, expert_token_counts: np.ndarray) -> ExpertActivity:
        activity = self.inner.activity(expert_token_counts)
        counts = np.asarray(expert_token_counts).astype(np.int16)
        return _RecordedActivity(**{f.name: getattr(activity, f.name) for f in dataclasses.fields(activity)},
                                 counts=counts)

    def iteration_activity(self, batch: BatchShape, activity: ExpertActivity) -> LatencyBreakdown:
        latency = self.inner.iteration_activity(batch, activity)
        assert isinstance(activity, _RecordedActivity) and activity.counts is not None, "exact routing only"
        self.records.append((batch, activity.counts, latency))
        return latency

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@dataclass(frozen=True)
class ValidationIteration:
    """One simulated iteration to execute on the GPU, with the latency the cost model predicted for it."""

    model_key: str
    policy: str
    index: int  # iteration number in its simulated run
    shape: BatchShape
    expert_token_counts: np.ndarray  # int16 [moe_layers, experts], as the policy chose
    predicted: LatencyBreakdown
    predicted_gpu_s: float  # predicted minus the CPU-side iteration_overhead_s, which no kernel measures
    cost_model: str  # "measured" or "roofline"

    @property
    def kind(self) -> str:
        if self.shape.num_prefill_tokens and self.shape.num_decode_tokens:
            return "mixed"
        return "prefill" if self.shape.num_prefill_tokens else "decode"

    def row(self) -> dict[str, Any]:
        """The iteration's columns of the validation CSV (without the measurement)."""
        shape = self.shape
        contexts = np.concatenate(
            [shape.decode_context_tokens, shape.prefill_context_tokens + shape.prefill_chunk_tokens]
        )
        distinct = (self.expert_token_counts > 0).sum(axis=1)
        return {
            "model": self.model_key,
            "policy": self.policy,
            "iteration": self.index,
            "kind": self.kind,
            "decode_batch": shape.num_decode_tokens,
            "prefill_chunks": int(shape.prefill_chunk_tokens.size),
            "prefill_tokens": shape.num_prefill_tokens,
            "tokens": shape.num_tokens,
            "mean_context": float(contexts.mean()) if contexts.size else 0.0,
            "max_context": int(contexts.max()) if contexts.size else 0,
            "mean_distinct_experts": float(distinct.mean()),
            "min_distinct_experts": int(distinct.min()),
            "max_distinct_experts": int(distinct.max()),
            "cost_model": self.cost_model,
            "predicted_s": self.predicted_gpu_s,
            "predicted_attention_s": self.predicted.attention_s,
            "predicted_dense_s": self.predicted.dense_s,
            "predicted_moe_s": self.predicted.moe_s,
            "predicted_communication_s": self.predicted.communication_s,
        }


LYNX_FALLBACK = {"alpha": 3.0, "beta": 2.0}
"""Lynx constants for models with none published (OLMoE-1B-7B): those of the published models with top-8 of
64..128 experts (Qwen3-30B-A3B, Qwen3-235B-A22B)."""


def _policy_entry(model_key: str, name: str) -> dict[str, Any]:
    from lynxsim.models import load_catalog_model

    if name == "lynx" and load_catalog_model(model_key).lynx_alpha is None:
        return {"name": name, **LYNX_FALLBACK}
    return {"name": name}


def validation_config(
    model_key: str, hardware: str, policies: list[str], *, seed: int = 0, requests: int = VALIDATION_REQUESTS,
    tensor_parallel: int = 1,
) -> ExperimentConfig:
    """The validation workload for one model on one GPU or a TP group (see the module docstring)."""
    return ExperimentConfig.model_validate({
        "name": f"validate-{model_key}",
        "model": model_key,
        "hardware": hardware,
        "workload": {
            "arrival": {"kind": "list", "times_s": [0.0] * requests},
            "prompt_tokens": {"kind": "uniform", "low_tokens": 32, "high_tokens": 512},
            "output_tokens": {"kind": "uniform", "low_tokens": 8, "high_tokens": 512},
        },
        "serving": {"max_num_seqs": 256, "max_num_batched_tokens": 2048, "chunked_prefill": True},
        "deployment": {"parallelism": {"tensor_parallel": tensor_parallel}},
        "policies": [_policy_entry(model_key, name) for name in policies],
        "simulation": {"seed": seed},
        "output": {"figures": False},
    })


def simulate_and_record(config: ExperimentConfig, model_key: str) -> dict[str, list[ValidationIteration]]:
    """Simulate every policy of ``config``; return, per policy label, every iteration it ran, priced."""
    from lynxsim.runner import prepare, simulate_policy

    setup = prepare(config)
    out: dict[str, list[ValidationIteration]] = {}
    for label, entry, policy in setup.policies:
        recorder = RecordingCostModel(setup.cost_model)
        simulate_policy(dataclasses.replace(setup, cost_model=recorder), label, entry, policy)
        out[label] = [
            ValidationIteration(
                model_key=model_key, policy=label, index=i, shape=shape, expert_token_counts=counts,
                predicted=latency, predicted_gpu_s=setup.cost_model.gpu_time_s(latency),
                cost_model=setup.cost_model.source,
            )
            for i, (shape, counts, latency) in enumerate(recorder.records)
        ]
    return out


def select_iterations(
    iterations: list[ValidationIteration],
    batch_targets: tuple[int, ...] = DECODE_BATCH_TARGETS,
    mixed: int = MIXED_ITERATIONS,
) -> list[ValidationIteration]:
    """Pure-decode iterations at each target batch size (the middle one of those with exactly that batch, else
    the nearest batch not already taken), plus ``mixed`` mixed prefill/decode iterations spread evenly over
    those the run had; in iteration order."""
    decode = [it for it in iterations if it.kind == "decode"]
    chosen: dict[int, ValidationIteration] = {}
    by_batch: dict[int, list[ValidationIteration]] = {}
    for it in decode:
        by_batch.setdefault(it.shape.num_decode_tokens, []).append(it)
    for target in batch_targets:
        if not by_batch:
            break
        batch = min(by_batch, key=lambda b: (abs(b - target), b))
        group = by_batch[batch]
        pick = group[len(group) // 2]
        chosen.setdefault(pick.index, pick)
    mixed_all = [it for it in iterations if it.kind == "mixed"]
    if mixed_all and mixed:
        positions = np.linspace(0, len(mixed_all) - 1, num=min(mixed, len(mixed_all))).round().astype(int)
        for p in dict.fromkeys(positions.tolist()):
            chosen.setdefault(mixed_all[p].index, mixed_all[p])
    return [chosen[i] for i in sorted(chosen)]


def expert_assignment(counts: np.ndarray, tokens: int, top_k: int) -> np.ndarray:
    """Expert ids ``[tokens, top_k]`` (int32) with exactly ``counts[e]`` tokens on expert ``e``: assignments
    listed expert by expert, assignment ``i`` going to token ``i mod tokens``. Each expert's run of
    ``counts[e] <= tokens`` consecutive assignments lands on distinct tokens, and each token gets exactly
    ``top_k`` assignments when the counts sum to ``tokens * top_k`` (every non-dropping policy), so each token's
    experts are distinct, as a router's are."""
    counts = np.asarray(counts, dtype=np.int64)
    if counts.min(initial=0) < 0 or counts.max(initial=0) > tokens:
        raise ValueError(f"expert token counts must lie in [0, {tokens}]")
    if int(counts.sum()) != tokens * top_k:
        raise ValueError(f"counts sum to {int(counts.sum())}, not tokens x top_k = {tokens * top_k}: "
                         "validation executes non-dropping policies only")
    experts = np.repeat(np.arange(counts.size, dtype=np.int32), counts)
    ids = np.empty((tokens, top_k), dtype=np.int32)
    order = np.arange(experts.size)
    ids[order % tokens, order // tokens] = experts
    return ids


def reprice(iterations: list[ValidationIteration], cost_model: CostModel) -> list[ValidationIteration]:
    """The same iterations priced by ``cost_model`` (e.g. after calibration has replaced the tables)."""
    out = []
    for it in iterations:
        latency = cost_model.iteration(it.shape, it.expert_token_counts.astype(np.int64))
        out.append(dataclasses.replace(
            it, predicted=latency, predicted_gpu_s=cost_model.gpu_time_s(latency), cost_model=cost_model.source
        ))
    return out


def save_iterations(path: Path, iterations: list[ValidationIteration]) -> Path:
    """Write iterations (shapes and expert token counts; not the prices) to one compressed ``.npz``: per model
    a group of arrays, ragged per-iteration lists stored flat with offsets, counts as int16."""
    groups: dict[str, list[ValidationIteration]] = {}
    for it in iterations:
        groups.setdefault(it.model_key, []).append(it)
    # Any, not np.ndarray: numpy's stub would type the **arrays unpacked below against savez's allow_pickle flag
    arrays: dict[str, Any] = {"models": np.asarray(list(groups), dtype=np.str_)}
    for g, items in enumerate(groups.values()):
        for attr in ("decode_context_tokens", "prefill_chunk_tokens", "prefill_context_tokens"):
            parts = [getattr(it.shape, attr) for it in items]
            arrays[f"g{g}_{attr}"] = np.concatenate(parts).astype(np.int64)
            arrays[f"g{g}_{attr}_offsets"] = np.cumsum([0] + [p.size for p in parts]).astype(np.int64)
        arrays[f"g{g}_policy"] = np.asarray([it.policy for it in items], dtype=np.str_)
        arrays[f"g{g}_index"] = np.asarray([it.index for it in items], dtype=np.int64)
        arrays[f"g{g}_counts"] = np.stack([it.expert_token_counts for it in items]).astype(np.int16)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path


def recorded_models(path: Path) -> list[str]:
    """The catalog keys whose iterations a file of ``save_iterations`` holds, in its order."""
    with np.load(path, allow_pickle=False) as data:
        return [str(model) for model in data["models"].tolist()]


def load_iterations(path: Path, cost_models: dict[str, CostModel]) -> list[ValidationIteration]:
    """Read iterations written by ``save_iterations`` and price them with ``cost_models[model_key]``."""
    out: list[ValidationIteration] = []
    with np.load(path, allow_pickle=False) as data:
        for g, model in enumerate(data["models"].tolist()):
            if model not in cost_models:
                continue
            ragged = {attr: (data[f"g{g}_{attr}"], data[f"g{g}_{attr}_offsets"])
                      for attr in ("decode_context_tokens", "prefill_chunk_tokens", "prefill_context_tokens")}

            def part(attr: str, i: int, ragged: dict = ragged) -> np.ndarray:
                values, offsets = ragged[attr]
                return values[offsets[i]:offsets[i + 1]]

            policies = data[f"g{g}_policy"].tolist()
            indices = data[f"g{g}_index"].tolist()
            counts = data[f"g{g}_counts"]
            for i, (policy, index) in enumerate(zip(policies, indices, strict=True)):
                shape = BatchShape(
                    prefill_chunk_tokens=part("prefill_chunk_tokens", i),
                    prefill_context_tokens=part("prefill_context_tokens", i),
                    decode_context_tokens=part("decode_context_tokens", i),
                )
                placeholder = LatencyBreakdown(0.0, 0.0, 0.0, 0.0, 0.0)
                out.append(ValidationIteration(model, policy, int(index), shape, counts[i], placeholder, 0.0, ""))
    by_model: dict[str, list[ValidationIteration]] = {}
    for it in out:
        by_model.setdefault(it.model_key, []).append(it)
    priced = {m: reprice(items, cost_models[m]) for m, items in by_model.items()}
    return [it for m in by_model for it in priced[m]]
