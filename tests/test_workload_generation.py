"""Arrival processes, length sources and the request list: statistics, trace replay and scaling, determinism."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lynxsim.errors import InputError
from lynxsim.workload import (
    EmpiricalLength,
    FixedLength,
    GammaArrivals,
    LognormalLength,
    PairedLengths,
    PoissonArrivals,
    TraceArrivals,
    UniformLength,
    generate_requests,
    load_azure_csv,
)
from shared_data import REQUEST_TRACES

AZURE_CODE = REQUEST_TRACES / "AzureLLMInferenceTrace_code.csv"
AZURE_CONV = REQUEST_TRACES / "AzureLLMInferenceTrace_conv.csv"
CONV_ARRIVALS = TraceArrivals(path=AZURE_CONV, format="azure")


def _columns(requests: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (
        np.array([r.arrival_s for r in requests]),
        np.array([r.prompt_tokens for r in requests]),
        np.array([r.output_tokens for r in requests]),
    )


# ----- gamma and Poisson ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("cv", [0.25, 0.5, 1.0, 2.0, 4.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_gamma_rate_and_cv(cv: float, seed: int) -> None:
    arrivals = GammaArrivals(rate_per_s=8.0, cv=cv)
    times = arrivals.times_s(np.random.default_rng(seed), 200_000, None)
    gaps = np.diff(np.concatenate([[0.0], times]))
    assert len(times) == 200_000 and np.all(gaps >= 0)
    assert 1.0 / gaps.mean() == pytest.approx(8.0, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.05)


def _ks_exponential(gaps: np.ndarray, rate: float) -> float:
    """Kolmogorov-Smirnov distance between the gaps' empirical CDF and Exp(rate)."""
    x = np.sort(gaps)
    cdf = 1.0 - np.exp(-rate * x)
    n = len(x)
    return float(max(np.max(np.arange(1, n + 1) / n - cdf), np.max(cdf - np.arange(n) / n)))


def test_gamma_cv1_is_statistically_poisson() -> None:
    n = 50_000
    gamma = np.diff(GammaArrivals(rate_per_s=3.0, cv=1.0).times_s(np.random.default_rng(5), n, None), prepend=0.0)
    poisson = np.diff(PoissonArrivals(rate_per_s=3.0).times_s(np.random.default_rng(5), n, None), prepend=0.0)
    critical = 1.95 / np.sqrt(n)  # KS at the 0.1% level
    assert _ks_exponential(gamma, 3.0) < critical and _ks_exponential(poisson, 3.0) < critical
    bursty = np.diff(GammaArrivals(rate_per_s=3.0, cv=2.0).times_s(np.random.default_rng(5), n, None), prepend=0.0)
    assert _ks_exponential(bursty, 3.0) > 10 * critical
    # counts in 10 s windows: Poisson's index of dispersion (variance / mean) is 1; a gamma renewal's tends to cv**2
    for gaps, dispersion in ((gamma, 1.0), (bursty, 4.0)):
        counts = np.bincount((np.cumsum(gaps) // 10.0).astype(int))[:-1]
        assert counts.var() / counts.mean() == pytest.approx(dispersion, rel=0.2)


def test_gamma_duration() -> None:
    times = GammaArrivals(rate_per_s=20.0, cv=3.0).times_s(np.random.default_rng(2), None, 500.0)
    assert times.max() < 500.0 and len(times) == pytest.approx(10_000, rel=0.15)


def test_poisson_draws_unchanged() -> None:
    """Poisson arrivals still consume the generator as before gamma arrived: old seeds give old workloads."""
    rng = np.random.default_rng(0)
    expected = np.cumsum(np.random.default_rng(0).exponential(0.5, size=7))
    assert np.array_equal(PoissonArrivals(rate_per_s=2.0).times_s(rng, 7, None), expected)


# ----- trace replay and time scaling ----------------------------------------------------------------------------


def test_trace_arrivals_replay_the_trace_with_its_lengths() -> None:
    trace = load_azure_csv(AZURE_CONV)
    requests = generate_requests(CONV_ARRIVALS, seed=0)
    times, prompts, outputs = _columns(requests)
    assert len(requests) == 19_366
    assert np.array_equal(times, trace.arrival_s)
    assert np.array_equal(prompts, trace.prompt_tokens) and np.array_equal(outputs, trace.output_tokens)


def test_speedup_halves_the_span() -> None:
    plain = TraceArrivals(path=AZURE_CODE, format="azure")
    fast = TraceArrivals(path=AZURE_CODE, format="azure", speedup=2.0)
    trace = load_azure_csv(AZURE_CODE)
    times, rows = fast.select(trace, None, None)
    assert len(times) == 8819 and np.array_equal(rows, np.arange(8819))
    assert times[-1] == pytest.approx(trace.span_s / 2)
    assert np.allclose(times * 2, plain.select(trace, None, None)[0])


def test_target_rate_gives_that_mean_rate() -> None:
    arrivals = TraceArrivals(path=AZURE_CONV, format="azure", rate_per_s=12.0)
    times, _ = arrivals.select(load_azure_csv(AZURE_CONV), None, None)
    assert (len(times) - 1) / (times[-1] - times[0]) == pytest.approx(12.0, rel=1e-9)
    slower = TraceArrivals(path=AZURE_CONV, format="azure", rate_per_s=1.0).select(
        load_azure_csv(AZURE_CONV), None, None
    )[0]
    assert slower[-1] == pytest.approx(19_365.0)


@settings(max_examples=30, deadline=None)
@given(
    gaps=st.lists(st.floats(0.0, 100.0), min_size=2, max_size=40).filter(lambda g: sum(g[1:]) > 1e-3),
    speedup=st.floats(0.01, 100.0),
)
def test_scaling_is_one_factor(tmp_path_factory: pytest.TempPathFactory, gaps: list[float], speedup: float) -> None:
    path = tmp_path_factory.mktemp("t") / "t.csv"
    path.write_text("t,p,o\n" + "".join(f"{float(t)!r},5,1\n" for t in np.cumsum(gaps)))
    source = {"path": path, "format": "csv", "columns": {"arrival": "t", "prompt": "p", "output": "o"}}
    trace = TraceArrivals(**source).load()
    times = TraceArrivals(**source, speedup=speedup).select(trace, None, None)[0]
    assert np.allclose(times, trace.arrival_s / speedup)
    assert np.all(np.diff(times) >= 0)


def test_windows_num_requests_duration_start() -> None:
    trace = load_azure_csv(AZURE_CONV)
    first = generate_requests(CONV_ARRIVALS, seed=0, num_requests=100)
    assert [r.arrival_s for r in first] == trace.arrival_s[:100].tolist()
    fast = TraceArrivals(path=AZURE_CONV, format="azure", speedup=4.0)
    ten_minutes = generate_requests(fast, seed=0, duration_s=600.0)  # scaled time: the trace's first 40 minutes
    assert len(ten_minutes) == int(np.count_nonzero(trace.arrival_s < 2400.0))
    assert max(r.arrival_s for r in ten_minutes) < 600.0
    both = generate_requests(fast, seed=0, duration_s=600.0, num_requests=50)
    assert len(both) == 50
    late = TraceArrivals(path=AZURE_CONV, format="azure", start_s=1800.0)
    times, rows = late.select(trace, 10, None)
    skipped = int(np.searchsorted(trace.arrival_s, 1800.0))
    assert rows.tolist() == list(range(skipped, skipped + 10))
    assert np.allclose(times, trace.arrival_s[skipped : skipped + 10] - 1800.0)
    with pytest.raises(InputError, match="after the trace's last arrival"):
        TraceArrivals(path=AZURE_CONV, format="azure", start_s=4000.0).select(trace, None, None)


def test_num_requests_beyond_the_trace_takes_all() -> None:
    assert len(generate_requests(TraceArrivals(path=AZURE_CODE, format="azure"), seed=0, num_requests=50_000)) == 8819


def test_a_whole_trace_and_paired_gamma_arrivals_generate_every_request() -> None:
    """(How fast is benchmarks/' business, not a timed test's.)"""
    from lynxsim.workload.traces import clear_trace_cache

    clear_trace_cache()
    assert len(generate_requests(CONV_ARRIVALS, seed=0)) == 19_366
    paired = generate_requests(
        GammaArrivals(rate_per_s=5.0, cv=2.0),
        paired_lengths=PairedLengths(path=AZURE_CONV, format="azure"),
        seed=0,
        num_requests=19_366,
    )
    assert len(paired) == 19_366


# ----- lengths --------------------------------------------------------------------------------------------------


def test_empirical_lengths_reproduce_the_trace_distribution() -> None:
    trace = load_azure_csv(AZURE_CONV)
    requests = generate_requests(
        PoissonArrivals(rate_per_s=5.0),
        EmpiricalLength(path=AZURE_CONV, format="azure"),
        EmpiricalLength(path=AZURE_CONV, format="azure"),
        seed=3,
        num_requests=100_000,
    )
    _, prompts, outputs = _columns(requests)
    assert set(np.unique(prompts)) <= set(trace.prompt_tokens.tolist())
    quantiles = [0.1, 0.25, 0.5, 0.75, 0.9, 0.99]
    for drawn, recorded in ((prompts, trace.prompt_tokens), (outputs, trace.output_tokens)):
        assert np.quantile(drawn, quantiles) == pytest.approx(np.quantile(recorded, quantiles), rel=0.03)
        assert drawn.mean() == pytest.approx(recorded.mean(), rel=0.01)
    # drawn independently: prompt and output are uncorrelated, unlike in the trace
    assert abs(np.corrcoef(prompts, outputs)[0, 1]) < 0.02


def test_empirical_column_and_clip() -> None:
    trace = load_azure_csv(AZURE_CODE)
    length = EmpiricalLength(path=AZURE_CODE, format="azure", column="output", max_tokens=100)
    drawn = length.sample(np.random.default_rng(0), 50_000, "prompt")  # the explicit column wins over the slot
    assert drawn.max() == 100 and set(np.unique(drawn)) <= set(np.minimum(trace.output_tokens, 100).tolist())


def test_paired_lengths_keep_rows_together() -> None:
    trace = load_azure_csv(AZURE_CONV)
    rows = set(zip(trace.prompt_tokens.tolist(), trace.output_tokens.tolist(), strict=True))
    requests = generate_requests(
        PoissonArrivals(rate_per_s=5.0),
        paired_lengths=PairedLengths(path=AZURE_CONV, format="azure"),
        seed=4,
        num_requests=50_000,
    )
    _, prompts, outputs = _columns(requests)
    assert set(zip(prompts.tolist(), outputs.tolist(), strict=True)) <= rows
    recorded = np.corrcoef(trace.prompt_tokens, trace.output_tokens)[0, 1]
    assert np.corrcoef(prompts, outputs)[0, 1] == pytest.approx(recorded, abs=0.02)
    assert prompts.mean() == pytest.approx(trace.prompt_tokens.mean(), rel=0.02)


def test_trace_arrivals_with_one_length_replaced() -> None:
    trace = load_azure_csv(AZURE_CONV)
    requests = generate_requests(CONV_ARRIVALS, FixedLength(tokens=64), seed=0, num_requests=500)
    _, prompts, outputs = _columns(requests)
    assert (prompts == 64).all() and np.array_equal(outputs, trace.output_tokens[:500])


def test_missing_length_sources() -> None:
    with pytest.raises(ValueError, match="prompt_tokens and output_tokens, or paired_lengths"):
        generate_requests(PoissonArrivals(rate_per_s=1.0), FixedLength(tokens=4), seed=0, num_requests=3)
    with pytest.raises(ValueError, match="excludes"):
        generate_requests(
            CONV_ARRIVALS, FixedLength(tokens=4), paired_lengths=PairedLengths(path=AZURE_CONV, format="azure"), seed=0
        )


def test_trace_errors_name_the_workload_key(tmp_path: Path) -> None:
    with pytest.raises(InputError) as info:
        generate_requests(TraceArrivals(path=tmp_path / "absent.csv", format="azure"), seed=0)
    assert info.value.where == f"workload.arrival: {tmp_path / 'absent.csv'}"
    (tmp_path / "lengths.jsonl").write_text('{"p": 1}\n')
    length = EmpiricalLength(path=tmp_path / "lengths.jsonl", format="jsonl", columns={"prompt": "p"})
    with pytest.raises(InputError) as info:
        generate_requests(PoissonArrivals(rate_per_s=1.0), FixedLength(tokens=2), length, seed=0, num_requests=3)
    assert info.value.where.startswith("workload.output_tokens: ") and "no output column" in info.value.problem


# ----- determinism ----------------------------------------------------------------------------------------------

WORKLOADS = {
    "gamma-lognormal": (
        GammaArrivals(rate_per_s=4.0, cv=3.0),
        LognormalLength(median_tokens=300, sigma=1.0, max_tokens=4096),
        UniformLength(low_tokens=1, high_tokens=300),
        None,
    ),
    "gamma-paired": (GammaArrivals(rate_per_s=4.0, cv=0.5), None, None, PairedLengths(path=AZURE_CODE, format="azure")),
    "trace-empirical": (
        TraceArrivals(path=AZURE_CODE, format="azure", rate_per_s=3.0),
        EmpiricalLength(path=AZURE_CONV, format="azure"),
        None,
        None,
    ),
}


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_same_seed_same_requests(name: str) -> None:
    arrival, prompt, output, paired = WORKLOADS[name]
    runs = [
        generate_requests(arrival, prompt, output, paired_lengths=paired, seed=seed, num_requests=2000)
        for seed in (11, 11, 12)
    ]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]
    assert all(isinstance(r.prompt_tokens, int) and isinstance(r.arrival_s, float) for r in runs[0])


def test_streams_are_independent() -> None:
    """Changing the output distribution leaves arrivals and prompts as they were."""
    arrival = GammaArrivals(rate_per_s=4.0, cv=2.0)
    prompt = EmpiricalLength(path=AZURE_CONV, format="azure")
    a = _columns(generate_requests(arrival, prompt, FixedLength(tokens=8), seed=5, num_requests=300))
    b = _columns(
        generate_requests(arrival, prompt, UniformLength(low_tokens=1, high_tokens=9), seed=5, num_requests=300)
    )
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and not np.array_equal(a[2], b[2])
