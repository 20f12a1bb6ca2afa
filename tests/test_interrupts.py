"""Ctrl-C ends a command with one line, exit code 130, and nothing unfinished written as finished (issue 18).

Each test runs the real command in a child process of its own process group and sends the group SIGINT once the
command is under way, as a terminal does with every process of the command (a sweep's workers included).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

EXPERIMENT = {
    "name": "interrupted",
    "model": "mixtral-8x7b",
    "hardware": "h200",
    "workload": {
        "arrival": {"kind": "poisson", "rate_per_s": 20.0},
        "prompt_tokens": {"kind": "fixed", "tokens": 64},
        "output_tokens": {"kind": "fixed", "tokens": 64},
    },
    "routing": {"kind": "synthetic"},
    "policies": [{"name": "topk", "label": "short"}, {"name": "lynx", "label": "long"}],
    "simulation": {"seed": 0, "num_requests": 30000},
    "output": {"figures": False},
}


def _interrupt_after(argv: list[str], marker: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Run ``python -m lynxsim argv``; send SIGINT once ``marker`` is on its standard output."""
    env = {**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-m", "lynxsim", *argv], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env, start_new_session=True)
    assert process.stdout is not None
    seen = []
    deadline = time.monotonic() + 120
    for line in process.stdout:
        seen.append(line)
        if marker in line or time.monotonic() > deadline:
            break
    assert any(marker in line for line in seen), "".join(seen)
    os.killpg(process.pid, signal.SIGINT)
    out, err = process.communicate(timeout=60)
    return subprocess.CompletedProcess(process.args, process.returncode, "".join(seen) + out, err)


def test_an_interrupted_run_keeps_its_finished_policies_aside(tmp_path: Path) -> None:
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(EXPERIMENT))
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.resolved.yaml").write_text("an earlier run's\n")  # a run directory a rerun may replace
    # SIGINT as the first policy ends: the second (Lynx, slower than top-k on the same requests) is under way
    result = _interrupt_after(["run", "exp.yaml", "--out", "run"], "done short", tmp_path)
    assert result.returncode == 130, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lynxsim: interrupted"), result.stderr
    # the earlier run directory is untouched; the finished policy's records wait in run.partial, with no summary
    assert (out / "config.resolved.yaml").read_text() == "an earlier run's\n"
    partial = tmp_path / "run.partial"
    assert (partial / "policies" / "short" / "requests.parquet").is_file()
    assert not (partial / "summary.json").exists()


def test_an_interrupted_sweep_ends_in_one_line_with_its_finished_points_stored(tmp_path: Path) -> None:
    data = {**EXPERIMENT, "simulation": {"seed": 0, "num_requests": 2000},
            "sweep": {"grid": {"workload.arrival.rate_per_s": [4, 5, 6, 7, 8, 9, 10, 11]}}}
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(data))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-m", "lynxsim", "sweep", "exp.yaml", "--out", "sweep", "--workers",
                                "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env,
                               start_new_session=True)
    points = tmp_path / "sweep" / "points"
    deadline = time.monotonic() + 120
    while not (points.is_dir() and any(points.iterdir())) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert points.is_dir() and any(points.iterdir()), "no point finished"
    os.killpg(process.pid, signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lynxsim: interrupted"), err  # no worker's traceback
    assert len(list(points.iterdir())) < 8
