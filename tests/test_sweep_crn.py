"""Sweeps pair their points on common random numbers by default (issue 18): every point of a repeat runs on the
same seed, so points differ only by what is swept; ``seed: per_point`` still draws each point its own seed, and a
results store filled under that former default is never read as the paired sweep's."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import yaml

from lynxsim.sections.sweep import SweepConfig, SweepPoint, derive_seed
from lynxsim.sweep.backends import LocalPool
from lynxsim.sweep.driver import run_sweep
from lynxsim.sweep.points import load_sweep
from lynxsim.sweep.store import ResultsStore

ALPHAS = [0.5, 0.7, 0.9]
EXPERIMENT = {
    "name": "crn",
    "model": "mixtral-8x7b",
    "hardware": "h200",
    "workload": {
        "arrival": {"kind": "poisson", "rate_per_s": 4.0},
        "prompt_tokens": {"kind": "uniform", "low_tokens": 32, "high_tokens": 128},
        "output_tokens": {"kind": "uniform", "low_tokens": 8, "high_tokens": 24},
    },
    "serving": {"max_num_seqs": 8},
    "policies": [{"name": "topk"}, {"name": "lynx"}],
    "simulation": {"seed": 11, "num_requests": 6},
}
REQUEST_DRAWS = ["request_id", "arrival_s", "prompt_tokens", "output_tokens"]
"""What the workload draws for each request from the seed: the same at every point when the points are paired."""


def write(folder: Path, sweep: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump({**EXPERIMENT, "sweep": sweep}, sort_keys=False))
    return path


def alpha_sweep(folder: Path, seed: str | None = None) -> Path:
    """A sweep of Lynx's alpha alone, the seed mode left to its default unless given."""
    return write(folder, {"grid": {"policies.1.alpha": ALPHAS}, **({"seed": seed} if seed else {})})


def point_requests(out: Path) -> dict[int, pd.DataFrame]:
    """Each current point's requests (every policy's), in a fixed order, by point index."""
    frame = ResultsStore(out).query(
        f"SELECT p.point, r.policy_dir, {', '.join(f'r.{c}' for c in REQUEST_DRAWS)} "
        "FROM requests r JOIN points p USING (config_hash) ORDER BY p.point, r.policy_dir, r.request_id"
    )
    return {int(point): rows.drop(columns="point").reset_index(drop=True) for point, rows in frame.groupby("point")}


def test_the_default_pairs_the_points() -> None:
    assert SweepConfig().seed == "per_repeat"
    assert SweepConfig(seed="per_point").seed == "per_point"


def test_seeds_are_derived_as_before() -> None:
    """Fixed values (taken before the default changed): the derivation depends on nothing but the base seed, the
    repeat and (per_point) the values, in any process, and per_point still reaches the runs stored under it."""
    point = SweepPoint(3, {"rate": 2.0, "model": "m"}, repeat=0)
    assert derive_seed(7, point, "per_point") == 1310758383
    assert derive_seed(7, SweepPoint(3, {"rate": 2.0, "model": "m"}, 1), "per_point") == 1462445326
    assert derive_seed(7, point, "per_repeat") == 2800045939
    assert derive_seed(7, SweepPoint(0, {"rate": 9.0}, repeat=0), "per_repeat") == 2800045939
    assert derive_seed(7, SweepPoint(3, {"rate": 2.0, "model": "m"}, 1), "per_repeat") == 2144903353


def test_a_policy_sweep_gives_every_point_one_seed_and_per_point_its_own(tmp_path: Path) -> None:
    paired = load_sweep(alpha_sweep(tmp_path / "paired"))
    assert len({p.config.simulation.seed for p in paired.points}) == 1
    assert all(p.config.simulation.seed == derive_seed(11, p.point, "per_repeat") for p in paired.points)
    assert paired.distinct_runs == len(ALPHAS)  # one seed, but the swept alpha still tells the points apart
    independent = load_sweep(alpha_sweep(tmp_path / "independent", "per_point"))
    assert len({p.config.simulation.seed for p in independent.points}) == len(ALPHAS)
    assert all(p.config.simulation.seed == derive_seed(11, p.point, "per_point") for p in independent.points)
    # the seed is in the config, so in the hash that keys stored runs: the default's are per_repeat's, and no
    # per_point run is taken for a paired one
    spelled_out = load_sweep(alpha_sweep(tmp_path / "spelled_out", "per_repeat"))
    assert [p.config_hash for p in spelled_out.points] == [p.config_hash for p in paired.points]
    assert {p.config_hash for p in paired.points}.isdisjoint(p.config_hash for p in independent.points)
    repeated = load_sweep(write(tmp_path / "repeated", {"grid": {"policies.1.alpha": ALPHAS}, "repeats": 2}))
    by_repeat = {r: {p.config.simulation.seed for p in repeated.points if p.point.repeat == r} for r in (0, 1)}
    assert all(len(seeds) == 1 for seeds in by_repeat.values()) and by_repeat[0] != by_repeat[1]


def test_paired_points_see_the_same_requests_and_a_former_default_store_is_not_reused(tmp_path: Path) -> None:
    """The alpha sweep run first with per_point seeds (the former default), then with the default into the same
    store: every point runs again (their seeds, so their config hashes, differ), the results hold only the paired
    runs, and those share their requests; top-k, which alpha cannot change, gives one result at every point."""
    out = tmp_path / "out"
    with LocalPool(1) as pool:
        former = run_sweep(load_sweep(alpha_sweep(tmp_path / "former", "per_point")), out, pool=pool)
        assert (former.ran, former.skipped, former.failures) == (len(ALPHAS), 0, {})
        independent = point_requests(out)
        assert not independent[0]["arrival_s"].equals(independent[1]["arrival_s"])  # what made top-k wander
        paired = load_sweep(alpha_sweep(tmp_path / "paired"))
        report = run_sweep(paired, out, pool=pool)
        assert (report.ran, report.skipped, report.failures) == (len(ALPHAS), 0, {})
        requests = point_requests(out)
        for point in range(1, len(ALPHAS)):
            pd.testing.assert_frame_equal(requests[point], requests[0])
        results = ResultsStore(out).query("SELECT * EXCLUDE (wall_s, simulated_s_per_wall_s) FROM results")
        assert sorted(results["seed"].unique()) == [paired.points[0].config.simulation.seed]
        assert len(results) == 2 * len(ALPHAS)
        topk = results[results["policy"] == "topk"].drop(columns=["point", "config_hash", "policies.1.alpha"])
        assert len(topk.drop_duplicates()) == 1
        lynx = results[results["policy"] == "lynx"]
        assert lynx["tpot_p50_ms"].nunique() > 1 or lynx["retained_mass"].nunique() > 1  # alpha still acts
        again = run_sweep(load_sweep(alpha_sweep(tmp_path / "former", "per_point")), out, pool=pool)
        assert (again.ran, again.skipped) == (0, len(ALPHAS))  # per_point finds its stored runs again
