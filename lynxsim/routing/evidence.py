"""What stands behind a run's routing: real router outputs, a generator fitted to real statistics or to a trace,
or assumed parameters; and the routing a model gets by default.

How much a batch-aware policy saves follows the router, so every run says which routing evidence its numbers
rest on (``routing_evidence`` in its summary, config.resolved.yaml and the paper report). The default routing
of a catalog model (``routing: {kind: model}``) is its shipped profile,
``lynxsim/routing/data/profiles/<catalog key>.yaml``, fitted to that model's published statistics
(``lynxsim/routing/data/statistics/``) by ``lynxsim routing fit``; a model
without one is routed by the plain generator, whose defaults are Mixtral-like assumptions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lynxsim.errors import InputError
from lynxsim.routing.profiles import PROFILE_DIR
from lynxsim.yaml_input import read_yaml_mapping

ASSUMED = "assumed: the plain generator's Mixtral-like defaults"


def model_profile(model_key: str | None) -> Path | None:
    """The shipped profile of a catalog model (``PROFILE_DIR/<key>.yaml``), or None."""
    if not model_key:
        return None
    path = PROFILE_DIR / f"{model_key}.yaml"
    return path if path.is_file() else None


def profile_evidence(path: Path) -> str:
    """One line on what a routing profile was fitted to, read from its ``source`` and ``fitted`` blocks."""
    try:
        document = read_yaml_mapping(path, "routing profile")
    except InputError:
        return f"profile {path.name} (unreadable source)"
    source: dict[str, Any] = document.get("source") or {}
    fitted: dict[str, Any] = document.get("fitted") or {}
    if "statistics" in source:
        repositories = ", ".join(str(s.get("repository")) for s in source.get("sources", []))
        assumed = sorted(k for k, v in (fitted.get("evidence") or {}).items() if str(v).startswith("assumed"))
        tail = f"; assumed: {', '.join(assumed)}" if assumed else ""
        return f"fitted to real routing statistics of {source.get('model')} ({repositories}){tail}"
    if "trace" in source:
        return f"fitted to a recorded trace: {source.get('trace')} ({source.get('model')}, {source.get('origin')})"
    return f"profile {path.name}"


def routing_evidence(section: Any, model_key: str | None, model_name: str) -> str:
    """The evidence behind a run's routing source (``section``: its ``routing`` config) for ``model_key``."""
    kind = getattr(section, "kind", "synthetic")
    if kind == "plugin":
        return f"plug-in routing source {section.name!r}: its evidence is the plug-in's to state"
    if kind == "trace":
        return f"real router outputs replayed: {section.path}"
    if kind == "profile":
        from lynxsim.routing.profiles import profile_path

        path = profile_path(section.name) if section.name is not None else Path(section.path)
        return f"profile {section.name or path.name}: {profile_evidence(path)}"
    if kind == "model":
        found = model_profile(model_key)
        if found is not None:
            return f"{model_name}'s profile: {profile_evidence(found)}"
        return f"{ASSUMED}; no routing evidence for {model_name}"
    return "assumed: synthetic generator parameters set in the experiment"
