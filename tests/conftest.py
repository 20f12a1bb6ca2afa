"""Test-wide isolation: statistical routing tables are cached in a folder of this test session, never in the
user's ~/.cache (a stale table there must not decide a test, nor a test leave files behind). And mypy, the
slowest static check (about 15 s), is started in the background as soon as its test is collected, so that it runs
on the second core while the other tests run (``test_static_checks.py`` waits for it)."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

MYPY_TEST = "test_static_checks.py::test_mypy_finds_nothing"
MYPY_RUN = pytest.StashKey[tuple[subprocess.Popen[bytes], Path]]()
"""The background mypy run and the folder holding its cache and its report."""


@pytest.fixture(autouse=True)
def _private_table_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path_factory.getbasetemp() / "lynxsim-cache"
    monkeypatch.setenv("LYNXSIM_CACHE_DIR", str(folder))
    return folder


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if importlib.util.find_spec("mypy") is None or not any(item.nodeid.endswith(MYPY_TEST) for item in items):
        return
    folder = Path(tempfile.mkdtemp(prefix="lynxsim-mypy-"))
    with open(folder / "report.txt", "wb") as report:  # a file, not a pipe: nobody reads until the test does
        process = subprocess.Popen(
            [sys.executable, "-m", "mypy", "--cache-dir", str(folder / "cache")],  # the package: [tool.mypy]
            cwd=Path(__file__).resolve().parents[1], stdout=report, stderr=subprocess.STDOUT,
        )
    config.stash[MYPY_RUN] = (process, folder)


def pytest_unconfigure(config: pytest.Config) -> None:
    run = config.stash.get(MYPY_RUN, None)
    if run is None:
        return
    process, folder = run
    if process.poll() is None:  # the session ended before its test waited for it
        process.kill()
        process.wait()
    shutil.rmtree(folder, ignore_errors=True)
