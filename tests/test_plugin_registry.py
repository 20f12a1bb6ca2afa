"""The registries of what users extend (lynxsim/plugins.py): built-ins by name, entry points discovered once and
loaded once, parameters checked against a factory's signature, and every unknown name an input error that names
the config key and the known names; a config that names no plug-in dumps and hashes as before."""

from __future__ import annotations

from collections.abc import Iterable
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any

import pytest
import yaml

from lynxsim import plugins
from lynxsim.cli import main
from lynxsim.config import ExperimentConfig, load_experiment, validate_experiment
from lynxsim.plugins import Registry
from lynxsim.sweep.points import config_hash

GROUP = "lynxsim.test_widgets"


def widget(*, context: str, size: int, colour: str = "red") -> tuple[str, int, str]:
    """A factory as registries hold them: the engine's ``context`` by keyword, the experiment's parameters."""
    return context, size, colour


def contextless(*, size: int) -> int:
    return size


def open_ended(*, context: str, **params: Any) -> dict[str, Any]:
    return {"context": context, **params}


def registry_with(
    monkeypatch: pytest.MonkeyPatch, entries: Iterable[tuple[str, str]]
) -> tuple[Registry[Any], list[str]]:
    """A registry of one built-in (``widget``) whose entry-point group holds ``entries``; the list records each
    scan of the installed packages."""
    scans: list[str] = []

    def entry_points(*, group: str) -> list[EntryPoint]:
        scans.append(group)
        return [EntryPoint(name, value, group) for name, value in entries]

    monkeypatch.setattr(plugins, "entry_points", entry_points)
    registry: Registry[Any] = Registry("widget", "widgets", GROUP, {"widget": f"{__name__}:widget"},
                                       engine_arguments=("context",))
    return registry, scans


def test_builtins_never_scan_the_installed_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    registry, scans = registry_with(monkeypatch, [("fancy", f"{__name__}:open_ended")])
    assert registry.bind("widget", {"size": 3})(context="engine") == ("engine", 3, "red")
    assert registry.origin("widget") == "lynxsim"
    assert scans == []


def test_entry_points_are_discovered_once_and_loaded_once(monkeypatch: pytest.MonkeyPatch) -> None:
    registry, scans = registry_with(monkeypatch, [("fancy", f"{__name__}:open_ended")])
    assert registry.plugin_names() == ("fancy",)
    first = registry.load("fancy")
    assert first is open_ended and registry.load("fancy") is first
    assert registry.bind("fancy", {"shade": 2})(context="c") == {"context": "c", "shade": 2}
    with pytest.raises(ValueError, match="unknown widget 'nope'"):
        registry.check("nope")
    assert scans == [GROUP]


def test_unknown_name_lists_builtins_then_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    registry, _ = registry_with(monkeypatch, [("fancy", f"{__name__}:open_ended")])
    with pytest.raises(ValueError, match=r"^unknown widget 'nope'; known widgets: widget; from plug-ins: fancy$"):
        registry.load("nope")
    with pytest.raises(ValueError, match="unknown widget 3"):
        registry.check(3)  # type: ignore[arg-type]


def test_a_plugin_cannot_replace_a_builtin(monkeypatch: pytest.MonkeyPatch) -> None:
    registry, _ = registry_with(monkeypatch, [("widget", f"{__name__}:open_ended")])
    with pytest.warns(UserWarning, match="declares the widget 'widget', which is built in"):
        assert registry.plugin_names() == ()
    assert registry.load("widget") is widget


def test_a_name_two_packages_declare_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    registry, _ = registry_with(monkeypatch, [("twin", f"{__name__}:open_ended"), ("twin", f"{__name__}:widget")])
    with pytest.raises(ValueError, match="'twin' is declared by several installed packages"):
        registry.load("twin")


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("widget", {"size": 1, "shape": "round"},
         r"widget 'widget': unknown parameter\(s\) shape; known parameters: size, colour"),
        ("widget", {"colour": "blue"}, r"widget 'widget': missing parameter\(s\) size; known parameters: size, colour"),
        ("widget", {"size": 1, "context": "mine"}, r"widget 'widget': unknown parameter\(s\) context"),
        ("bare", {"size": 1},
         r"widget 'bare' \(.*\) does not take context: every widget factory is called with context"),
    ],
)
def test_parameters_are_checked_against_the_signature(
    monkeypatch: pytest.MonkeyPatch, name: str, params: dict[str, Any], message: str
) -> None:
    registry, _ = registry_with(monkeypatch, [("bare", f"{__name__}:contextless")])
    assert registry.parameters("widget") == ("size", "colour")
    with pytest.raises(ValueError, match=message):
        registry.bind(name, params)


# ----- the experiment's keys ----------------------------------------------------------------------------------------

SMALL: dict[str, Any] = {
    "name": "small",
    "model": "mixtral-8x7b",
    "hardware": "h200",
    "workload": {
        "arrival": {"kind": "poisson", "rate_per_s": 8.0},
        "prompt_tokens": {"kind": "uniform", "low_tokens": 16, "high_tokens": 64},
        "output_tokens": {"kind": "uniform", "low_tokens": 4, "high_tokens": 16},
    },
    "policies": [{"name": "topk"}],
    "simulation": {"seed": 1, "num_requests": 8},
}


@pytest.fixture
def small_file(tmp_path: Path) -> Path:
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(SMALL, sort_keys=False))
    return path


@pytest.mark.parametrize(
    ("assignment", "message"),
    [
        ("deployment.router=random",
         "deployment.router: unknown router 'random'; known routers: least_outstanding, round_robin"),
        ("serving.scheduler={name: fifo, depth: 2}",
         "serving.scheduler: unknown scheduler 'fifo'; known schedulers: vllm"),
        ("hardware.cost_model=analytic",
         "hardware.cost_model: unknown cost model 'analytic'; known cost models: profile"),
        ("routing={kind: plugin, name: replayed}",
         "routing.name: unknown routing source 'replayed'; known routing sources: model, profile, synthetic, trace"),
        ("policies.0.name=lynks", "policies[0]: unknown policy 'lynks'; known policies: capacity, lynx, oea, prune"),
        ("routing={kind: plugin, name: trace}", "routing.name: 'trace' is built in: write kind: trace"),
        ("deployment.router={name: round_robin, stride: 2}",
         "deployment.router: router 'round_robin': unknown parameter(s) stride; known parameters: none"),
    ],
)
def test_an_unknown_name_is_one_line_naming_the_key_and_the_known_names(
    small_file: Path, capsys: pytest.CaptureFixture[str], assignment: str, message: str
) -> None:
    assert main(["check", str(small_file), "--set", assignment]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("lynxsim: error: ") and message in error


def test_a_config_without_plugins_dumps_and_hashes_as_before(small_file: Path) -> None:
    """The new keys stay out of the dump at their defaults, and the router dumps as its bare name, so a config's
    hash (the key of stored sweep runs) does not change with this feature."""
    config = load_experiment(small_file)
    dumped = config.model_dump(mode="json")
    assert "scheduler" not in dumped["serving"] and "cost_model" not in dumped["hardware"]
    assert dumped["deployment"]["router"] == "round_robin"
    spelled_out = load_experiment(small_file, ["serving.scheduler=vllm", "hardware.cost_model={name: profile}",
                                               "deployment.router={name: round_robin}"])
    assert config_hash(spelled_out) == config_hash(config)
    assert ExperimentConfig.model_validate(spelled_out.model_dump(exclude_unset=True)) == spelled_out == config


def test_choices_keep_their_parameters() -> None:
    config = validate_experiment({
        **SMALL, "deployment": {"replicas": 2, "router": {"name": "least_outstanding"}},
        "serving": {"scheduler": {"name": "vllm"}},
    })
    assert config.deployment.router.name == "least_outstanding" and config.deployment.router.params == {}
    assert not config.deployment.router.is_plugin and not config.serving.scheduler.is_plugin
