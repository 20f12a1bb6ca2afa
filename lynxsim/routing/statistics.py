"""Routing statistics: what is known about a real model's router when no trace of it is at hand.

A recorded trace (``lynxsim.routing.trace``) holds every token's expert choices; what is public about most
models is less: a histogram of expert choices per layer, a log of how many experts decode batches activated,
a few hundred tokens' top-2 weights. A statistics file holds such aggregates, each with its source, so that the
generator can be fitted to them (``lynxsim.routing.fit_statistics``) and its residual against every one of them
reported. The shipped files live in ``lynxsim/routing/data/statistics/`` (fit data) and its ``checks/``
(data kept out of the fit, to check it); only aggregated numbers are stored, so data without a licence is cited,
never copied.

Format (YAML, ``format: lynxsim-routing-statistics``, ``format_version: 1``)::

    model: deepseek-coder-v2            # the catalog key the numbers describe
    sources: [{repository, commit, files, license, setup, statistics: [names], notes}]
    num_moe_layers / num_experts / top_k
    statistics:                         # any subset of:
      batch_distinct:                   # distinct experts a decode batch activates, per MoE layer
        - {batch_size, policy: topk | {name: lynx, alpha, beta}, steps, mean: [L], std: [L]}
      selection_frequency:              # share of tokens whose top-k holds each expert (rows sum to top_k)
        {layers: [..] (default all), tokens, domains, frequency: [[E] per listed layer]}
      mean_probability:                 # mean router probability of each expert id (rows sum to 1)
        {layers, mean: [[E] per listed layer]}
      top2_weight:                      # renormalised top-2 weight of each token's first expert, w1 / (w1 + w2)
        {layers, tokens, median: [..], quartiles: [[q25, q75] ..]}
      repeat_top1:                      # share of consecutive tokens of one sequence with the same top-1 expert
        {layers, share: [..]}
      overlap_excess:                   # top-k experts two tokens of one sequence share, minus two of different ones
        {layers, value: [..]}

A malformed file raises ``InputError`` naming the file and the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lynxsim.errors import InputError
from lynxsim.yaml_input import read_yaml_mapping

STATISTICS_FORMAT = "lynxsim-routing-statistics"
STATISTICS_FORMAT_VERSION = 1
STATISTICS_DIR = Path(__file__).resolve().parent / "data" / "statistics"  # package data, as the profiles
CHECKS_DIR = STATISTICS_DIR / "checks"


class _Block(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class _Layered(_Block):
    layers: list[int] | None = Field(default=None, description="MoE-layer indices the rows describe; None: all")

    def layer_ids(self, num_moe_layers: int) -> list[int]:
        return list(range(num_moe_layers)) if self.layers is None else list(self.layers)


class LynxPolicy(_Block):
    name: Literal["lynx"]
    alpha: float = Field(gt=0)
    beta: int | None = Field(default=None, gt=0)


class BatchDistinct(_Block):
    batch_size: int = Field(ge=1)
    policy: Literal["topk"] | LynxPolicy
    steps: int = Field(ge=1, description="decode steps averaged")
    mean: list[float] = Field(description="mean distinct experts per MoE layer")
    std: list[float] | None = None

    @property
    def policy_label(self) -> str:
        if self.policy == "topk":
            return "topk"
        assert isinstance(self.policy, LynxPolicy)
        return f"lynx(alpha={self.policy.alpha:g}, beta={self.policy.beta})"


class SelectionFrequency(_Layered):
    tokens: int | None = Field(default=None, ge=1)
    domains: str | None = None
    frequency: list[list[float]]


class MeanProbability(_Layered):
    mean: list[list[float]]


class Top2Weight(_Layered):
    tokens: int | None = Field(default=None, ge=1)
    median: list[float]
    quartiles: list[tuple[float, float]]


class RepeatTop1(_Layered):
    share: list[float]


class OverlapExcess(_Layered):
    value: list[float]


class Statistics(_Block):
    batch_distinct: list[BatchDistinct] = Field(default_factory=list)
    selection_frequency: SelectionFrequency | None = None
    mean_probability: MeanProbability | None = None
    top2_weight: Top2Weight | None = None
    repeat_top1: RepeatTop1 | None = None
    overlap_excess: OverlapExcess | None = None

    def names(self) -> list[str]:
        """The statistics the file holds, in the order the fit reads them."""
        return [name for name in type(self).model_fields if getattr(self, name)]


class Source(_Block):
    repository: str
    commit: str | None = None
    files: list[str] = Field(default_factory=list)
    license: str
    setup: str
    statistics: list[str] | None = Field(default=None, description="which statistics come from here; None: all")
    notes: str | None = None


class RoutingStatistics(_Block):
    """One statistics file (module docstring)."""

    format: Literal["lynxsim-routing-statistics"]
    format_version: Literal[1]
    model: str
    sources: list[Source] = Field(min_length=1)
    num_moe_layers: int = Field(ge=1)
    num_experts: int = Field(ge=2)
    top_k: int = Field(ge=1)
    statistics: Statistics

    @model_validator(mode="after")
    def _shapes(self) -> RoutingStatistics:
        s, layers, experts = self.statistics, self.num_moe_layers, self.num_experts
        for i, entry in enumerate(s.batch_distinct):
            if len(entry.mean) != layers or (entry.std is not None and len(entry.std) != layers):
                raise ValueError(f"statistics.batch_distinct.{i}: mean/std need one value per MoE layer ({layers})")
        for name in ("selection_frequency", "mean_probability", "top2_weight", "repeat_top1", "overlap_excess"):
            block = getattr(s, name)
            if block is None:
                continue
            ids = block.layer_ids(layers)
            if any(not 0 <= i < layers for i in ids):
                raise ValueError(f"statistics.{name}.layers: MoE-layer indices must lie in [0, {layers})")
            rows = {"selection_frequency": "frequency", "mean_probability": "mean", "top2_weight": "median",
                    "repeat_top1": "share", "overlap_excess": "value"}[name]
            values = getattr(block, rows)
            if len(values) != len(ids):
                raise ValueError(f"statistics.{name}.{rows}: one entry per listed layer ({len(ids)})")
            if name in ("selection_frequency", "mean_probability") and any(len(r) != experts for r in values):
                raise ValueError(f"statistics.{name}.{rows}: rows of {experts} values (one per expert)")
        return self


def load_statistics(path: str | Path) -> RoutingStatistics:
    """A statistics file; ``InputError`` naming the file and key where it is malformed."""
    where = str(path)
    document = read_yaml_mapping(path, "routing statistics")
    if document.get("format") != STATISTICS_FORMAT:
        raise InputError(where, f"not a routing statistics file (no 'format: {STATISTICS_FORMAT}')")
    try:
        return RoutingStatistics.model_validate(document)
    except ValidationError as exc:
        error = exc.errors()[0]
        key = ".".join(str(part) for part in error["loc"]) or "(file)"
        raise InputError(where, f"{key}: {error['msg']}") from None


def is_statistics_file(path: Path) -> bool:
    """Whether ``path`` is a YAML file declaring the statistics format (a routing trace is an .npz or a folder)."""
    if not path.is_file() or path.suffix not in (".yaml", ".yml"):
        return False
    head = path.read_text(encoding="utf-8", errors="replace")[:4096]
    return f"format: {STATISTICS_FORMAT}" in head


def shipped_statistics(model_key: str) -> tuple[Path | None, Path | None]:
    """The fit and check statistics files shipped for a catalog model (None where there is none)."""
    fit, check = STATISTICS_DIR / f"{model_key}.yaml", CHECKS_DIR / f"{model_key}.yaml"
    return (fit if fit.is_file() else None), (check if check.is_file() else None)
