"""The statistical mode's table cache: a second run reads the tables the first built and gives the same numbers;
a changed policy parameter is another table; a damaged file is rebuilt; writes leave no partial file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from lynxsim.config import validate_experiment
from lynxsim.routing.table_cache import cache_dir, cached_table, load_table, table_key
from lynxsim.runner import run_experiment

CONFIG = {
    "name": "cache",
    "model": "mixtral-8x7b",
    "hardware": "h200",
    "workload": {
        "arrival": {"kind": "poisson", "rate_per_s": 4.0},
        "prompt_tokens": {"kind": "uniform", "low_tokens": 16, "high_tokens": 300},
        "output_tokens": {"kind": "uniform", "low_tokens": 2, "high_tokens": 60},
    },
    "serving": {"max_num_seqs": 32, "max_num_batched_tokens": 512},
    "policies": [{"name": "topk"}, {"name": "lynx"}],
    "simulation": {"seed": 1, "num_requests": 40, "routing_mode": "statistical", "statistical_samples": 4},
    "output": {"figures": False},
}


def _run(config: dict, out: Path) -> tuple[pd.DataFrame, dict[str, dict[str, float]]]:
    result = run_experiment(validate_experiment(config), out)
    summaries = {run.label: run.summary for run in result.runs}
    return pd.concat([run.iterations for run in result.runs]), summaries


def test_a_second_run_reads_the_tables_and_gives_the_same_numbers(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LYNXSIM_CACHE_DIR", str(tmp_path / "cache"))  # empty, whatever other tests cached
    first, first_summary = _run(CONFIG, tmp_path / "a")
    files = sorted(cache_dir().glob("*.npz"))
    assert len(files) == 2  # the top-k baseline and lynx's own table
    assert first_summary["lynx"]["routing_table_cached"] == 0.0
    second, second_summary = _run(CONFIG, tmp_path / "b")
    assert second_summary["lynx"]["routing_table_cached"] == 1.0
    assert sorted(cache_dir().glob("*.npz")) == files
    assert np.array_equal(first["latency_s"].to_numpy(), second["latency_s"].to_numpy())
    # another Lynx parameter is another table; the baseline is shared
    other = {**CONFIG, "policies": [{"name": "lynx", "alpha": 2.0, "beta": 1}]}
    _run(other, tmp_path / "c")
    assert len(list(cache_dir().glob("*.npz"))) == 3


def test_a_damaged_file_is_rebuilt_and_the_key_is_stable(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LYNXSIM_CACHE_DIR", str(tmp_path))
    parts = {"a": 1, "b": [1, 2]}
    assert table_key(parts) == table_key({"b": [1, 2], "a": 1}) != table_key({"a": 2, "b": [1, 2]})
    built = []

    def build():
        from lynxsim.routing.statistical import ActivityTable

        built.append(1)
        return ActivityTable("topk", np.array([1, 2]), np.ones((2, 3, 4), np.int16), np.ones((2, 3, 4), np.int32),
                             None, None, None, 0.5)

    table, _, cached = cached_table(parts, build)
    assert not cached and len(built) == 1
    path = cache_dir() / f"{table_key(parts)}.npz"
    assert load_table(path).distinct.shape == (2, 3, 4) and not list(cache_dir().glob("*.tmp"))
    path.write_bytes(b"truncated")
    again, _, cached = cached_table(parts, build)
    assert not cached and len(built) == 2 and np.array_equal(again.distinct, table.distinct)
    assert cached_table(parts, build)[2] and len(built) == 2
