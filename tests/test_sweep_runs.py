"""Running sweeps: the results store, resuming after a kill, failures, both backends, query and plot."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from lynxsim.cli import main
from lynxsim.sweep.backends import LocalPool
from lynxsim.sweep.driver import run_sweep
from lynxsim.sweep.points import load_sweep
from lynxsim.sweep.store import POINTS_DIR, ResultsStore

REQUESTS = 6
SWEEP = {
    "name": "tiny-sweep",
    "model": "mixtral-8x7b",
    "hardware": "h200",
    "workload": {
        "arrival": {"kind": "poisson", "rate_per_s": 2.0},
        "prompt_tokens": {"kind": "fixed", "tokens": 96},
        "output_tokens": {"kind": "uniform", "low_tokens": 8, "high_tokens": 24},
    },
    "serving": {"max_num_seqs": 8},
    "policies": [{"name": "topk"}, {"name": "lynx"}],
    "simulation": {"seed": 3, "num_requests": REQUESTS},
    "sweep": {"grid": {"workload.arrival.rate_per_s": [1.0, 4.0], "policies.1.alpha": [0.5, 0.7, 0.9]}},
}
POINTS = 6
WALL_CLOCK_COLUMNS = "wall_s, simulated_s_per_wall_s"


def write_sweep(folder: Path, changes: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump({**SWEEP, **(changes or {})}, sort_keys=False))
    return path


def results_of(out: Path) -> pd.DataFrame:
    """Every stored number but the wall-clock ones, in a fixed order: what two runs of a sweep must share."""
    return ResultsStore(out).query(
        f"SELECT * EXCLUDE ({WALL_CLOCK_COLUMNS}) FROM results ORDER BY point, policy_position"
    )


def requests_of(out: Path) -> pd.DataFrame:
    return ResultsStore(out).query("SELECT * FROM requests ORDER BY config_hash, policy_dir, request_id")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sweep run once, uninterrupted, on the local backend with two workers."""
    folder = tmp_path_factory.mktemp("reference")
    out = folder / "out"
    report = run_sweep(load_sweep(write_sweep(folder)), out, workers=2)
    assert report.ran == POINTS and not report.failures
    return out


def test_store_holds_every_point_policy_and_request(reference: Path) -> None:
    results = results_of(reference)
    assert len(results) == POINTS * 2
    assert results.groupby("point")["policy"].apply(list).map(tuple).unique().tolist() == [("topk", "lynx")]
    assert results["requests_arrived"].eq(REQUESTS).all()
    # conservation: every request of every run and policy is in the record files, once
    requests = requests_of(reference)
    assert len(requests) == POINTS * 2 * REQUESTS
    assert not requests.duplicated(["config_hash", "policy_dir", "request_id"]).any()
    runs = ResultsStore(reference).query("SELECT status, records_dir FROM runs")
    assert runs["status"].eq("ok").all() and len(runs) == POINTS
    assert all((reference / d / "policies" / "lynx" / "iterations.parquet").is_file() for d in runs["records_dir"])
    # the swept keys are typed columns
    assert results["workload.arrival.rate_per_s"].dtype.kind == "f"
    lynx = results[results["policy"] == "lynx"]
    assert (lynx["retained_mass"] < 1).all() and results[results["policy"] == "topk"]["retained_mass"].eq(1).all()


def test_rerun_skips_finished_points_and_duplicates_nothing(reference: Path, tmp_path: Path) -> None:
    before = results_of(reference)
    report = run_sweep(load_sweep(write_sweep(tmp_path)), reference, workers=1)
    assert (report.ran, report.skipped) == (0, POINTS)
    pd.testing.assert_frame_equal(results_of(reference), before)


def test_killed_sweep_resumes_to_the_uninterrupted_result(reference: Path, tmp_path: Path) -> None:
    """SIGKILL the whole sweep (driver and workers) once some points are done, start it again, compare."""
    path = write_sweep(tmp_path)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "lynxsim", "sweep", str(path), "--out", str(out), "--workers", "1"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        finished = [p for p in (out / POINTS_DIR).glob("*") if not p.name.endswith(".partial")] if out.exists() else []
        if len(finished) >= 2:
            break
        time.sleep(0.01)
    assert process.poll() is None, f"the sweep ended before it could be killed: {process.stderr.read()!r}"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    interrupted = ResultsStore(out).query("SELECT count(*) AS n FROM runs")["n"].iloc[0]
    assert 1 <= interrupted < POINTS
    report = run_sweep(load_sweep(path), out, workers=1)
    assert report.ran == POINTS - report.skipped and report.skipped >= 1 and not report.failures
    pd.testing.assert_frame_equal(results_of(out), results_of(reference))
    pd.testing.assert_frame_equal(requests_of(out), requests_of(reference))
    assert not list((out / POINTS_DIR).glob("*.partial"))


def test_a_failing_point_is_recorded_and_the_sweep_goes_on(tmp_path: Path) -> None:
    changes = {"sweep": {"grid": {"policies.1.alpha": [0.7, -1.0]}}}
    path = write_sweep(tmp_path, changes)
    out = tmp_path / "out"
    report = run_sweep(load_sweep(path), out, workers=1)
    assert report.ran == 2 and len(report.failures) == 1
    (error,) = report.failures.values()
    assert "alpha" in error
    runs = ResultsStore(out).query("SELECT status, error FROM runs ORDER BY status")
    assert runs["status"].tolist() == ["failed", "ok"]
    assert len(results_of(out)) == 2  # the failed point has no summaries
    assert run_sweep(load_sweep(path), out, workers=1).ran == 0
    assert run_sweep(load_sweep(path), out, workers=1, retry_failed=True).ran == 1


def test_a_kept_pool_serves_several_sweeps_and_outlives_a_dead_worker(tmp_path: Path) -> None:
    """A report keeps one pool of workers for all its sweeps: the second sweep runs on the first's workers, and a
    worker that died between two sweeps (killed while idle) costs no point of the next one."""
    path = write_sweep(tmp_path, {"sweep": {"grid": {"policies.1.alpha": [0.5, 0.9]}}})
    with LocalPool(1) as pool:
        first = run_sweep(load_sweep(path), tmp_path / "first", pool=pool)
        executor = pool.executor()
        workers = set(executor._processes)  # the pool's own worker pids (no public accessor)
        second = run_sweep(load_sweep(path), tmp_path / "second", pool=pool)
        assert pool.executor() is executor and set(executor._processes) == workers
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while not executor._broken and time.monotonic() < deadline:  # until the pool has seen the death
            time.sleep(0.01)
        third = run_sweep(load_sweep(path), tmp_path / "third", pool=pool)
        assert pool.executor() is not executor
    for report in (first, second, third):
        assert report.ran == 2 and not report.failures
    for out in ("second", "third"):
        pd.testing.assert_frame_equal(results_of(tmp_path / out), results_of(tmp_path / "first"))


def test_ray_backend_gives_the_same_results(reference: Path, tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    try:  # the test starts its own local Ray; a machine that cannot run one at all skips, saying why
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    except (RuntimeError, ConnectionError, OSError) as exc:
        pytest.skip(f"no local Ray on this machine: {exc}")
    out = tmp_path / "out"
    try:
        report = run_sweep(load_sweep(write_sweep(tmp_path)), out, backend="ray", workers=2)
    finally:
        ray.shutdown()
    assert report.ran == POINTS and not report.failures
    pd.testing.assert_frame_equal(results_of(out), results_of(reference))
    pd.testing.assert_frame_equal(requests_of(out), requests_of(reference))


def test_query_prints_a_table_and_bad_sql_is_one_line(reference: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sql = 'SELECT policy, count(*) AS runs FROM results GROUP BY policy ORDER BY policy'
    assert main(["query", str(reference), sql]) == 0
    out = capsys.readouterr().out
    assert "lynx" in out and "topk" in out and "6" in out
    assert main(["query", str(reference), "SELECT nope FROM results"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lynxsim: error: query:") and err.count("\n") == 1


def test_plot_draws_the_sweep_figures_with_their_numbers(reference: Path, tmp_path: Path) -> None:
    assert main(["plot", str(reference)]) == 0
    figures = reference / "figures"
    names = {p.name for p in figures.glob("*.png")}
    assert {"speedup_vs_batch.png", "latency_vs_quality.png", "metrics_vs_policies_1_alpha.png"} <= names
    speedup = pd.read_csv(figures / "speedup_vs_batch.csv")
    assert len(speedup) == POINTS and (speedup["speedup_mean"] >= 1).all()
    busy = speedup[speedup["workload.arrival.rate_per_s"] == 4.0]
    # one sequence per batch at 1 request/s: a token already reads only its own experts, so Lynx changes nothing;
    # batches of several sequences at 4/s: Lynx reads fewer experts (all points draw their requests from one seed)
    light = speedup[speedup["workload.arrival.rate_per_s"] == 1.0]
    assert light["speedup_mean"].to_numpy() == pytest.approx(1.0, abs=1e-3)
    assert (busy["speedup_mean"] > 1.0).all()
    pareto = pd.read_csv(figures / "latency_vs_quality.csv")
    assert pareto["pareto"].any() and len(pareto) == POINTS * 2
    assert main(["plot", str(reference), "--metric", "no_such_metric"]) == 2


def test_a_folder_the_database_never_recorded_is_redone(tmp_path: Path) -> None:
    """The state a kill between the rename of a point's folder and its commit leaves: files, no row."""
    path = write_sweep(tmp_path, {"sweep": {"grid": {"policies.1.alpha": [0.5, 0.7]}}})
    sweep = load_sweep(path)
    out = tmp_path / "out"
    orphan = out / POINTS_DIR / sweep.points[0].config_hash
    (orphan / "policies").mkdir(parents=True)
    (orphan / "policies" / "stale.txt").write_text("left by a killed sweep")
    (out / POINTS_DIR / f"{sweep.points[1].config_hash}.partial").mkdir()
    report = run_sweep(sweep, out, workers=1)
    assert (report.ran, report.skipped) == (2, 0)
    assert not (orphan / "policies" / "stale.txt").exists()
    assert (orphan / "policies" / "topk" / "requests.parquet").is_file()
    assert not list((out / POINTS_DIR).glob("*.partial"))
    assert len(results_of(out)) == 4
