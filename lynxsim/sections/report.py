"""What a ``report:`` section says: which figure an experiment's sweep becomes, and how to shorten it.

Every figure and table of ``lynxsim report`` is one experiment file with a ``sweep:`` section (the runs) and a
``report:`` section (how to draw them), so the report is regenerated from files a reader can open, run alone
with ``lynxsim sweep``, and change.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

FigureKind = Literal[
    "experts_vs_batch", "latency_vs_experts", "tpot_table", "speedup_vs_batch", "speedup_vs_overhead",
    "slo_throughput", "policies",
]


class QuickMode(BaseModel):
    """How ``--quick`` shortens this experiment: base keys set (``--set`` paths) and a smaller sweep."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    set: dict[str, Any] = Field(default_factory=dict, description="key path -> value for the base experiment")
    sweep: dict[str, Any] | None = Field(default=None, description="replaces the sweep section (same schema)")


class ReportSection(BaseModel):
    """The ``report:`` section of an experiment in experiments/paper/."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    title: str
    figure: FigureKind = Field(description="how the sweep's results are drawn (lynxsim/report/figures.py)")
    text: str = Field(default="", description="markdown shown under the figure: what it shows and why")
    x: str | None = Field(default=None, description="swept key on the x axis")
    facet: str | None = Field(default=None, description="swept key whose values get a panel each")
    lines: list[str] = Field(default_factory=list, description="swept keys whose combinations get a line each")
    labels: dict[str, list[str]] = Field(
        default_factory=dict, description="swept key -> a label per value, in the sweep's order (for dict values)"
    )
    slo_tpot_ms: list[float] = Field(default_factory=list, description="slo_throughput: P99 TPOT targets (ms)")
    paper: list[str] = Field(
        default_factory=list, description="ids of docs/results/paper_published.yaml entries this figure reproduces"
    )
    quality_models: dict[str, str] = Field(
        default_factory=dict,
        description="policies: simulated model -> trained model of docs/quality.csv whose measured loss change "
        "is shown beside each policy (the same expert count and top-k where possible)",
    )
    quality_batch: int = Field(default=16, gt=0, description="policies: the decode batch of the measured loss")
    quick: QuickMode = Field(default_factory=QuickMode)
