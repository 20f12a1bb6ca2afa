"""The run directory on disk (lynxsim.records): written whole or not at all, one distinct safe folder per label."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lynxsim.errors import InputError
from lynxsim.records import RUN_MARKER, partial_dir, slug, staged_run_dir


@given(st.lists(st.text(min_size=1, max_size=120), min_size=2, max_size=6, unique=True))
def test_distinct_labels_get_distinct_safe_folders(labels: list[str]) -> None:
    folders = [slug(label) for label in labels]
    assert len(set(folders)) == len(labels)
    for folder in folders:
        assert re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.~-]*", folder) and len(folder) <= 100
        assert folder not in (".", "..")


@pytest.mark.parametrize(("label", "folder"), [("lynx", "lynx"), ("lynx-0.7_b1", "lynx-0.7_b1")])
def test_a_plain_label_is_its_own_folder(label: str, folder: str) -> None:
    assert slug(label) == folder


def test_a_rerun_replaces_the_run_directory_entirely(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / RUN_MARKER).write_text("old")
    (out / "policies" / "stale").mkdir(parents=True)
    with staged_run_dir(out) as stage:
        assert stage == partial_dir(out) and (out / RUN_MARKER).read_text() == "old"  # untouched while it runs
        (stage / RUN_MARKER).write_text("new")
    assert (out / RUN_MARKER).read_text() == "new" and not (out / "policies").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no stage, no old copy left


def test_a_failed_run_leaves_the_old_directory_and_its_partial_records(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / RUN_MARKER).write_text("old")
    with pytest.raises(KeyboardInterrupt), staged_run_dir(out) as stage:
        (stage / "first_policy.parquet").write_text("records")
        raise KeyboardInterrupt
    assert (out / RUN_MARKER).read_text() == "old"
    assert (partial_dir(out) / "first_policy.parquet").read_text() == "records"


@pytest.mark.parametrize("kind", ["file", "foreign folder"])
def test_what_is_not_a_run_directory_is_refused_and_kept(tmp_path: Path, kind: str) -> None:
    out = tmp_path / "out"
    if kind == "file":
        out.write_text("mine")
    else:
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    with pytest.raises(InputError) as info, staged_run_dir(out):
        pass
    assert info.value.where == str(out)
    assert (out.read_text() if kind == "file" else (out / "notes.txt").read_text()) == "mine"
    assert not partial_dir(out).exists()
