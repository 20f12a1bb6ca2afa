"""The lint and type checks CI runs, as tests: ``ruff check`` over ``lynxsim/`` and ``tests/``, and ``mypy`` over
the package, both configured in pyproject.toml (rules, exclusions, per-module settings). Each fails with the
tool's own report when it finds anything; each is skipped, with the reason, where its tool is not installed (both
are in the ``test`` extra).

mypy starts with an empty cache in a temporary folder, so that nothing left by another checkout or version
answers for this one: about 15 s on a lightly loaded 2-core machine, the slower of the two by far (ruff takes well
under a second). conftest.py starts it in the background when this test is collected; the test waits for it.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import MYPY_RUN

REPO = Path(__file__).resolve().parents[1]


def _run(tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    if importlib.util.find_spec(tool) is None:
        pytest.skip(f"{tool} is not installed (pip install -e '.[test]' installs it)")
    return subprocess.run(
        [sys.executable, "-m", tool, *args], cwd=REPO, capture_output=True, text=True, timeout=600, check=False
    )


def _report(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit code {result.returncode}\n{result.stdout}{result.stderr}"


def test_ruff_finds_nothing() -> None:
    result = _run("ruff", "check", "--no-cache", "lynxsim", "tests")
    assert result.returncode == 0, _report(result)


def test_mypy_finds_nothing(request: pytest.FixtureRequest) -> None:
    run = request.config.stash.get(MYPY_RUN, None)
    if run is None:  # not installed (conftest.py starts it only where it is)
        pytest.skip("mypy is not installed (pip install -e '.[test]' installs it)")
    process, folder = run
    returncode = process.wait(timeout=600)
    assert returncode == 0, f"exit code {returncode}\n{(folder / 'report.txt').read_text()}"
