"""Fit a model's routing statistics into its shipped profile, and write docs/routing_evidence.md: per catalog
model what is real, what is fitted, what is assumed, with figures of the fitted generator against the data.

``fit_and_save`` is ``lynxsim routing fit STATS.yaml``: the fit (``fit_statistics``), the fitted generator's
residual against the file's own statistics and against a check file held out of the fit, all in the profile.
``write_evidence`` is ``lynxsim routing evidence``: it redraws each shipped statistics-fitted profile through
``SyntheticRouting`` against its fit and check data (no refit: the profile is what runs), checks the targets
the profiles were made for, and lists the catalog models with no routing evidence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from lynxsim.routing.fit import load_profile  # noqa: E402
from lynxsim.routing.fit_statistics import (  # noqa: E402
    StatisticResidual,
    fit_statistics,
    generator_residuals,
    save_statistics_profile,
)
from lynxsim.routing.profiles import PROFILE_DIR  # noqa: E402
from lynxsim.routing.router import GroupLimit, group_limit_of  # noqa: E402
from lynxsim.routing.statistics import STATISTICS_DIR, RoutingStatistics, load_statistics, shipped_statistics  # noqa: E402

LAYER_GROUPS = ((0, 1), (1, 10), (10, 20), (20, 40), (40, 59))
"""MoE-layer groups of the DeepSeek-Coder-V2 depth-profile target (issue 16): layers 0, 1-9, 10-19, 20-39, 40-58."""
TOPK_TARGET, LYNX_TARGET, GROUP_TARGET = 0.05, 0.08, 0.15
"""DeepSeek-Coder-V2, decode batches of 16: mean distinct experts within 5% under top-k and 8% under Lynx; each
layer group's mean within 15%."""


@dataclass(frozen=True)
class ModelEvidence:
    """One model's statistics-fitted profile against its data."""

    model: str
    stats: RoutingStatistics
    evidence: dict[str, str]
    fit: list[StatisticResidual]
    check: list[StatisticResidual]
    check_file: Path | None


def _group_limit(model_key: str) -> GroupLimit | None:
    from lynxsim.models import load_catalog_model
    from lynxsim.models.catalog import catalog_names

    return group_limit_of(load_catalog_model(model_key)) if model_key in catalog_names() else None


def fit_and_save(statistics_path: Path, out: Path, *, check_path: Path | None = None, seed: int = 0) -> ModelEvidence:
    """Fit the statistics file, measure the fitted generator against it and against ``check_path``, and write the
    profile to ``out``."""
    stats = load_statistics(statistics_path)
    limit = _group_limit(stats.model)
    fit = fit_statistics(stats, group_limit=limit, seed=seed)
    fit.residuals = generator_residuals(stats, fit.params, group_limit=limit, seed=seed + 1)
    check = (generator_residuals(load_statistics(check_path), fit.params, group_limit=limit, seed=seed + 1)
             if check_path is not None else [])
    save_statistics_profile(out, stats, fit, statistics_file=_shown(statistics_path), group_limit=limit,
                            checks=check)
    return ModelEvidence(stats.model, stats, fit.evidence, fit.residuals, check, check_path)


def _shown(path: Path) -> str:
    """How a profile names its statistics file: a shipped one from the folder that holds the package
    (``lynxsim/routing/data/statistics/...``, the same in a checkout and an installed copy), others as given."""
    try:
        return path.resolve().relative_to(STATISTICS_DIR.parents[3]).as_posix()
    except ValueError:
        return path.as_posix()


def shipped_evidence(model_key: str, seed: int = 1) -> ModelEvidence | None:
    """The shipped profile of ``model_key`` redrawn against its shipped fit and check statistics (None where the
    model has no statistics-fitted profile)."""
    profile = PROFILE_DIR / f"{model_key}.yaml"
    fit_file, check_file = shipped_statistics(model_key)
    if fit_file is None or not profile.is_file():
        return None
    from lynxsim.yaml_input import read_yaml_mapping

    evidence = dict((read_yaml_mapping(profile, "routing profile").get("fitted") or {}).get("evidence") or {})
    params = load_profile(profile)
    stats = load_statistics(fit_file)
    limit = _group_limit(model_key)
    residuals = generator_residuals(stats, params, group_limit=limit, seed=seed)
    check = (generator_residuals(load_statistics(check_file), params, group_limit=limit, seed=seed)
             if check_file is not None else [])
    return ModelEvidence(model_key, stats, evidence, residuals, check, check_file)


def group_means(values: Sequence[float], groups: Sequence[tuple[int, int]] = LAYER_GROUPS) -> list[float]:
    v = np.asarray(values, dtype=np.float64)
    return [float(v[a:b].mean()) for a, b in groups if b <= v.size]


def _pct(x: float) -> str:
    return f"{100 * x:+.1f}%"


def _batch_table(evidence: ModelEvidence, residuals: list[StatisticResidual], label: str) -> list[str]:
    lines = []
    for r in residuals:
        if not r.name.startswith("batch_distinct") or len(r.data) != evidence.stats.num_moe_layers:
            continue
        data, gen = group_means(r.data), group_means(r.generator)  # the groups a model's depth reaches
        cells = " | ".join(f"{d:.1f} / {g:.1f} ({_pct(g / d - 1)})" for d, g in zip(data, gen, strict=True))
        ratio = np.mean(r.generator) / np.mean(r.data)
        overall = f"{np.mean(r.data):.2f} / {np.mean(r.generator):.2f} ({_pct(ratio - 1)})"
        lines.append(f"| {label} | {r.name} | {overall} | {cells} |")
    return lines


def _targets(evidence: ModelEvidence) -> list[str]:
    """The DeepSeek-Coder-V2 targets, checked on the fit data and on the held-out check data."""
    lines = []
    for label, residuals in (("fit data", evidence.fit), ("check data", evidence.check)):
        for r in residuals:
            if not r.name.startswith("batch_distinct"):
                continue
            overall = abs(np.mean(r.generator) / np.mean(r.data) - 1)
            limit = TOPK_TARGET if "topk" in r.name else LYNX_TARGET
            worst = max(abs(g / d - 1) for d, g in zip(group_means(r.data), group_means(r.generator), strict=True))
            lines.append(f"- {label}, {r.name}: mean within {100 * overall:.1f}% (target {100 * limit:.0f}%: "
                         f"{'met' if overall <= limit else 'NOT met'}); worst layer group {100 * worst:.1f}% "
                         f"(target {100 * GROUP_TARGET:.0f}%: {'met' if worst <= GROUP_TARGET else 'NOT met'})")
    return lines


def _distribution_table(residuals: list[StatisticResidual]) -> list[str]:
    lines = []
    for r in residuals:
        if r.distance is None:
            continue
        tv = np.asarray(r.distance)
        lines.append(f"| {r.name} | {len(r.layers)} | {np.median(tv):.3f} | "
                     f"{tv.max():.3f} (layer {r.layers[int(tv.argmax())]}) | "
                     f"{np.mean(r.data):.3f} / {np.mean(r.generator):.3f} |")
    return lines


def _figure(evidence: ModelEvidence, out_dir: Path) -> Path:
    """Per statistic, data against generator over MoE layers (fit data solid, check data open)."""
    panels = evidence.fit + evidence.check
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.4 * len(panels)), squeeze=False)
    for ax, r in zip(axes[:, 0], panels, strict=True):
        check = r in evidence.check
        ax.plot(r.layers, r.data, "o" if not check else "s", mfc="none" if check else None, label="data")
        ax.plot(r.layers, r.generator, "-", label="fitted generator")
        ax.set_title(f"{evidence.model}: {r.name}{' (held-out check data)' if check else ''}", fontsize=9)
        ax.set_ylabel(r.unit, fontsize=8)
        ax.legend(fontsize=7)
    axes[-1, 0].set_xlabel("MoE layer")
    fig.tight_layout()
    path = out_dir / f"routing_evidence_{evidence.model}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _deepseek_v3_section(batch: int = 16, batches: int = 64) -> list[str]:
    """DeepSeek-V3's router as lynxsim routes it (``lynxsim.routing.router``), and what the group limit does to a
    decode batch's experts, under the plain generator (no routing statistics of DeepSeek-V3 were found)."""
    from lynxsim.models import load_catalog_model
    from lynxsim.policies import Lynx, TopK
    from lynxsim.routing.fit_statistics import batch_distinct
    from lynxsim.routing.synthetic import SyntheticRouting

    model = load_catalog_model("deepseek-v3")
    limit = group_limit_of(model)
    assert limit is not None
    requests = np.arange(batch * batches, dtype=np.int64)
    rows = []
    for label, applied in (("group-limited (as routed)", limit), ("unconstrained", None)):
        routing = SyntheticRouting(model.num_moe_layers, model.num_experts, None, 7, request_cache_bytes=0,
                                   group_limit=applied)
        logits = routing.logits(requests, np.zeros_like(requests))
        topk = batch_distinct(logits, batch, TopK(), model.top_k).mean()
        lynx = batch_distinct(logits, batch, Lynx(alpha=1.0, beta=2), model.top_k).mean()
        rows.append(f"| {label} | {topk:.1f} | {lynx:.1f} |")
    return [
        "## deepseek-v3: the router as it is", "",
        f"DeepSeek-V3 scores experts with sigmoids, adds a per-expert correction bias for the selection only, and "
        f"limits each token to the best {limit.topk_groups} of {limit.num_groups} groups of "
        f"{model.num_experts // limit.num_groups} experts (a group scored by the sum of its two best scores), "
        f"then takes the top-{model.top_k} (`noaux_tc`). lynxsim routes it so (`lynxsim/routing/router.py`): "
        "the generator's logits stand for the gate logits (a sigmoid is increasing, so they rank the experts as "
        "the scores do; the correction bias, a popularity term, is part of the generator's expert bias), each "
        "group is scored by the sum of the sigmoids of its two best logits, and every expert outside the best "
        "groups is put 64 nats below the token's best logit. "
        "Lynx bins those logits as it bins a softmax router's: the bin of an expert is set by its logit gap to the "
        "token's best, and a sigmoid router's logit gaps are its log-odds gaps; masked experts lie in the deepest "
        "bin, where the batch's popularity can still reach them, as it can any low-affinity expert. DeepSeek-V3's "
        "combine weights are its sigmoid scores renormalised over the chosen experts; lynxsim's quality proxies "
        "read the softmax of the chosen logits, which orders and weighs them alike but not equally. No routing "
        "statistics of DeepSeek-V3 were found, so its generator parameters are the plain defaults (assumed).", "",
        f"Distinct experts per MoE layer of a decode batch of {batch} (plain generator, {batches} batches):", "",
        "| routing | top-k | Lynx (1, 2) |", "|---|---:|---:|", *rows, "",
    ]


def write_evidence(out_dir: Path) -> Path:
    """docs/routing_evidence.md and one figure per model with a statistics-fitted profile."""
    from lynxsim.models.catalog import catalog_names

    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Routing evidence: what stands behind each model's routing",
        "",
        "Generated by `lynxsim routing evidence`. How much a batch-aware policy saves follows the router, so each "
        "catalog model is routed by default (`routing: {kind: model}`) by its own profile, "
        "`lynxsim/routing/data/profiles/<model>.yaml`: lynxsim's generator fitted by `lynxsim routing fit` to the "
        "model's published routing statistics, `lynxsim/routing/data/statistics/<model>.yaml` (aggregated numbers "
        "with their sources; files without a licence are cited, not copied). Every run states its routing evidence "
        "(`routing_evidence` in summary.json, config.resolved.yaml and the printed summary). Below, per model: "
        "the sources, what each generator parameter was fitted to or assumed, and the fitted generator (drawn "
        "through `SyntheticRouting`, as a simulation draws it) against the data it was fitted to and against data "
        "held out of the fit (`lynxsim/routing/data/statistics/checks/`).",
        "",
    ]
    fitted = []
    for key in catalog_names():
        evidence = shipped_evidence(key)
        if evidence is None:
            continue
        fitted.append(key)
        figure = _figure(evidence, out_dir)
        lines += [f"## {key}", ""]
        for src in evidence.stats.sources:
            used = f" ({', '.join(src.statistics)})" if src.statistics else ""
            lines.append(f"- source{used}: `{src.repository}` at `{(src.commit or '')[:12]}`, "
                         f"licence: {src.license.rstrip('.')}. {src.setup}")
        lines += ["", "| parameter | evidence |", "|---|---|"]
        lines += [f"| {name} | {what} |" for name, what in evidence.evidence.items()]
        limit = _group_limit(key)
        lines += ["", f"Group-limited routing applied: {'no' if limit is None else limit}.", ""]
        batch_rows = _batch_table(evidence, evidence.fit, "fit") + _batch_table(evidence, evidence.check, "check")
        if batch_rows:
            lines += ["Distinct experts per MoE layer, data / fitted generator: the mean over layers, then the layer "
                      "groups 0, 1-9, 10-19, 20-39, 40-58.", "",
                      "| data | statistic | mean | group 0 | 1-9 | 10-19 | 20-39 | 40-58 |",
                      "|---|---|---|---|---|---|---|---|", *batch_rows, ""]
            lines += [*_targets(evidence), ""]
        distribution_rows = _distribution_table(evidence.fit) + _distribution_table(evidence.check)
        if distribution_rows:
            lines += ["Distributions over experts per layer: total-variation distance between the data's and the "
                      "generator's (0 identical, 1 disjoint) and the coefficient of variation over experts.", "",
                      "| statistic | layers | median distance | largest distance | CV data / generator |",
                      "|---|---:|---:|---:|---|", *distribution_rows, ""]
            for r in evidence.fit + evidence.check:
                if r.distance is not None:
                    where = "check data" if r in evidence.check else "fit data"
                    per_layer = ", ".join(f"{layer}: {d:.3f}" for layer, d in zip(r.layers, r.distance, strict=True))
                    lines += [f"- {r.name} ({where}), distance per MoE layer: {per_layer}"]
            lines.append("")
        others = [r for r in evidence.fit + evidence.check
                  if not r.name.startswith("batch_distinct") and r.distance is None]
        for r in others:
            err = r.relative_error()
            lines.append(f"- {r.name} ({r.unit}): data mean {np.mean(r.data):.3f}, "
                         f"generator {np.mean(r.generator):.3f}; median layer error {_pct(float(np.median(err)))}, "
                         f"largest {_pct(float(err[np.abs(err).argmax()]))}")
        lines += ["", f"![{key}: data against the fitted generator]({figure.name})", ""]
    lines += _deepseek_v3_section()
    rest = [k for k in catalog_names() if k not in fitted]
    lines += ["## Models without routing evidence", "",
              "No published routing statistics were found for these catalog models; each is routed by the plain "
              "generator with its Mixtral-like defaults (popularity skew 0.15, confidence 1.4 with spread 0.2, "
              "persistence 0.3), an assumption its runs state: " + ", ".join(rest) + ".", ""]
    path = out_dir / "routing_evidence.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
