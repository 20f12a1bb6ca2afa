"""Test-wide isolation: statistical routing tables are cached in a folder of this test session, never in the
user's ~/.cache (a stale table there must not decide a test, nor a test leave files behind)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _private_table_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path_factory.getbasetemp() / "lynxsim-cache"
    monkeypatch.setenv("LYNXSIM_CACHE_DIR", str(folder))
    return folder
