"""``lynxsim html``: one self-contained HTML page of a run directory or of a sweep's results folder, with the
summary, interactive (plotly) versions of the figures and, for a run, its resolved config."""

from __future__ import annotations

from pathlib import Path

from lynxsim.errors import InputError
from lynxsim.html_report.run_page import run_page
from lynxsim.html_report.sweep_page import sweep_page
from lynxsim.records import PARTIAL_SUFFIX, partial_dir
from lynxsim.sweep.store import DATABASE_NAME

PAGE_NAME = "report.html"


def write_html(folder: Path, out: Path | None = None) -> Path:
    """The page of ``folder`` (a run directory or a sweep's results folder) into ``out`` (default:
    ``folder/report.html``); returns its path. Any other folder, a run still in ``<dir>.partial`` among them, is
    ``InputError``."""
    if (folder / DATABASE_NAME).is_file():
        text = sweep_page(folder)
    elif (folder / "summary.json").is_file():
        text = run_page(folder)
    elif folder.name.endswith(PARTIAL_SUFFIX) or partial_dir(folder).is_dir():
        raise InputError(str(folder), f"a run that did not finish (its records are in '{PARTIAL_SUFFIX}' without a "
                         "summary): run it again to the end")
    elif not folder.exists():
        raise InputError(str(folder), "no such folder: give a run directory or a sweep's results folder")
    elif not folder.is_dir():
        raise InputError(str(folder), "not a folder: give a run directory or a sweep's results folder")
    else:
        raise InputError(str(folder), f"neither a run directory (summary.json) nor a sweep's results folder "
                         f"({DATABASE_NAME})")
    path = out if out is not None else folder / PAGE_NAME
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path
