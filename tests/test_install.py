"""An installed copy (a wheel, not the checkout) runs an experiment from any directory: the hardware profiles with
their measured kernel tables and the routing profiles ship as package data, nothing is read from the source tree.

The wheel is built and installed offline with the environment's own setuptools (``--no-build-isolation
--no-index``) into a folder of its own, from a copy of the project's top-level files and ``lynxsim/`` (what
setuptools reads to build it): a build inside the checkout would leave ``build/`` there, whose stale files a later
wheel could pick up. The installed copy is put first on the path with ``PYTHONPATH``; an editable install's finder
(setuptools appends it to ``sys.meta_path``) answers only for what the path does not hold, so it cannot win, and
the test checks where every module came from anyway.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

EXPERIMENT = {
    "name": "installed",
    "model": "mixtral-8x7b",  # has measured H200 tables and a shipped routing profile (routing: model, the default)
    "hardware": "h200",
    "workload": {
        "arrival": {"kind": "poisson", "rate_per_s": 4.0},
        "prompt_tokens": {"kind": "fixed", "tokens": 64},
        "output_tokens": {"kind": "fixed", "tokens": 8},
    },
    "policies": [{"name": "topk"}, {"name": "lynx"}],
    "simulation": {"num_requests": 8},
}


def _copy_project(destination: Path) -> None:
    """The files a wheel is built from: the top-level files (pyproject.toml, README.md) and the package."""
    destination.mkdir()
    for path in REPO.iterdir():
        if path.is_file():
            shutil.copy2(path, destination / path.name)
    shutil.copytree(REPO / "lynxsim", destination / "lynxsim", ignore=shutil.ignore_patterns("__pycache__"))


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A non-editable install of the project in a folder outside the checkout, and the environment that runs it
    (that folder alone on ``PYTHONPATH``; numba off, see ``test_an_installed_copy_runs_an_experiment``)."""
    root = tmp_path_factory.mktemp("install")
    source, site = root / "source", root / "site"
    _copy_project(source)
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
               "--no-cache-dir", "--disable-pip-version-check", "--target", str(site), str(source)]
    built = subprocess.run(command, capture_output=True, text=True)
    assert built.returncode == 0, built.stdout + built.stderr
    return site, {**os.environ, "PYTHONPATH": str(site), "LYNXSIM_NO_NUMBA": "1"}


def test_an_installed_copy_runs_an_experiment(installed: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    """``lynxsim run`` of the installed copy, from a directory with no profiles of its own, prices with the
    shipped measured H200 tables and routes Mixtral-8x7B by its shipped profile. Numba is switched off: compiling
    the fresh copy's kernels takes about 45 s on two cores, and they read no data files."""
    site, env = installed
    work = tmp_path / "work"
    work.mkdir()
    (work / "experiment.yaml").write_text(yaml.safe_dump(EXPERIMENT))

    where = subprocess.run(
        [sys.executable, "-c", "import lynxsim, lynxsim.hardware as h, lynxsim.routing.profiles as r; "
         "print(lynxsim.__file__); print(h.SHIPPED_PROFILE_DIR); print(r.PROFILE_DIR)"],
        cwd=work, env=env, capture_output=True, text=True, check=True,
    )
    for line in where.stdout.splitlines():
        assert Path(line).resolve().is_relative_to(site.resolve()), line

    run = subprocess.run([str(site / "bin" / "lynxsim"), "run", "experiment.yaml", "--out", "run", "--no-figures"],
                         cwd=work, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    summary = json.loads((work / "run" / "summary.json").read_text())
    assert summary["policies"] == ["topk", "lynx"]
    assert summary["cost_model"] == "measured"
    assert summary["routing_evidence"].startswith("Mixtral-8x7B-v0.1's profile: fitted to real routing statistics")


def test_an_installed_copy_names_its_profiles_for_an_unknown_one(
    installed: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    """An unknown hardware key ends with one line listing the shipped profiles, and exit code 2."""
    site, env = installed
    (tmp_path / "experiment.yaml").write_text(yaml.safe_dump({**EXPERIMENT, "hardware": "no-such-gpu"}))
    run = subprocess.run([str(site / "bin" / "lynxsim"), "check", "experiment.yaml"],
                         cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 2, run.stdout + run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown hardware profile 'no-such-gpu'" in lines[0], run.stderr
    assert "h200" in lines[0] and "mi300x" in lines[0]
