"""Tests of recorded routing traces: the file format, the fill-in of top-k-only recordings, the FLAME-MoE
importer (on the real files in ../shared/data) and replay as a routing source."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from lynxsim.errors import InputError
from lynxsim.routing import (
    RoutingTrace,
    TraceReplayRouting,
    import_flame,
    load_flame_csv_dir,
    load_trace,
    save_trace,
)
from lynxsim.routing.flame import read_flame_csv_dir
from lynxsim.routing.replay import layer_map
from lynxsim.routing.trace_format import (
    FILL_STRATEGIES,
    FLOOR_FACTOR,
    FillStrategy,
    TopKTrace,
    fill_logits,
    read_trace_file,
)
from shared_data import FLAME_DIR

FLAME_LAYERS = tuple(range(2, 10))


@pytest.fixture(scope="module")
def flame() -> TopKTrace:
    return read_flame_csv_dir(FLAME_DIR)


@pytest.fixture(scope="module")
def flame_csv() -> np.ndarray:
    """The CSV probabilities as float64 ``[layers, tokens, 64]``, read independently of the importer."""
    return np.stack(
        [pd.read_csv(FLAME_DIR / f"layer{layer:02d}.csv").iloc[:, 2:].to_numpy(np.float64) for layer in FLAME_LAYERS]
    )


def _probs(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    p = np.exp(x - x.max(axis=-1, keepdims=True))
    return p / p.sum(axis=-1, keepdims=True)


def _shared_experts(ids: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """Mean number of top-k experts tokens ``a[i]`` and ``b[i]`` share, over layers and pairs."""
    return float((ids[:, a, :, None] == ids[:, b, None, :]).any(axis=-1).sum(axis=-1).mean())


# --- FLAME-MoE import -------------------------------------------------------------------------------------------


def test_flame_import_matches_the_csv_files(flame: TopKTrace, flame_csv: np.ndarray) -> None:
    assert flame.topk_ids.shape == (8, 2048, 6)
    assert flame.num_experts == 64 and flame.layer_ids == FLAME_LAYERS
    assert (np.count_nonzero(flame_csv, axis=-1) == 6).all()
    ids = flame.topk_ids.astype(np.int64)
    recorded = np.zeros(flame_csv.shape, dtype=bool)
    np.put_along_axis(recorded, ids, True, axis=-1)
    assert np.array_equal(recorded, flame_csv > 0)  # the 6 ids are exactly the nonzero columns
    np.testing.assert_array_equal(flame.topk_probs, np.take_along_axis(flame_csv, ids, axis=-1).astype(np.float32))
    assert (np.diff(flame.topk_probs, axis=-1) <= 0).all()  # descending, as top-k lists are
    remaining = 1.0 - flame.topk_probs.astype(np.float64).sum(axis=-1)
    assert 0.0 < remaining.min() and remaining.max() < 1.0
    assert flame.license == "Apache-2.0"


def test_flame_rows_are_eight_interleaved_sequences(flame: TopKTrace) -> None:
    """The layout the importer assumes, checked against the routing itself (see lynxsim/routing/flame.py)."""
    t = np.arange(2048)
    np.testing.assert_array_equal(flame.sequence_ids, t % 8)
    np.testing.assert_array_equal(flame.positions, t // 8)
    ids = flame.topk_ids.astype(np.int64)
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2048, 20000)
    b = rng.integers(0, 2048, 20000)
    unrelated = _shared_experts(ids, a[a % 8 != b % 8], b[a % 8 != b % 8])
    next_position = _shared_experts(ids, t[:-8], t[8:])  # same sequence, consecutive positions
    next_row = _shared_experts(ids, t[:-1], t[1:])  # consecutive under a sequence-major reading
    assert 0.5 < unrelated < 0.65
    assert next_position > 2.0 * unrelated
    assert next_row < 1.15 * unrelated
    # No break where a 64-token sequence-major layout would end a sequence inside a lane.
    across_64 = t[(t // 8) % 64 == 63][:-8]
    assert _shared_experts(ids, across_64, across_64 + 8) > 1.8 * unrelated


def test_import_flame_writes_the_topk_form(flame: TopKTrace, tmp_path: Path) -> None:
    path = import_flame(FLAME_DIR, tmp_path / "flame.npz")
    with np.load(path) as npz:
        assert sorted(npz.files) == ["layer_ids", "meta", "positions", "sequence_ids", "topk_ids", "topk_probs"]
        assert npz["topk_ids"].dtype == np.int16 and npz["topk_probs"].dtype == np.float32
        assert npz["sequence_ids"].dtype == np.int32 and npz["layer_ids"].dtype == np.int32
        meta = json.loads(str(npz["meta"][()]))
    assert meta["num_experts"] == 64 and meta["license"] == "Apache-2.0" and meta["name"] == "flame-moe-290m"
    stored = read_trace_file(path)
    assert isinstance(stored, TopKTrace)
    np.testing.assert_array_equal(stored.topk_probs, flame.topk_probs)
    np.testing.assert_array_equal(stored.topk_ids, flame.topk_ids)
    for fill in FILL_STRATEGIES:
        from_file, from_csv = load_trace(path, fill=fill), load_flame_csv_dir(FLAME_DIR, fill=fill)
        np.testing.assert_array_equal(from_file.logits, from_csv.logits)


# --- fill strategies ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fill", FILL_STRATEGIES)
def test_fill_gives_back_the_recorded_topk(flame: TopKTrace, fill: FillStrategy) -> None:
    trace = flame.filled(fill)
    assert trace.logits.dtype == np.float32 and trace.logits.shape == (8, 2048, 64)
    assert np.isfinite(trace.logits).all()
    assert trace.recorded_top_k == 6 and trace.fill == fill
    ids = flame.topk_ids.astype(np.int64)
    p = _probs(trace.logits)
    np.testing.assert_allclose(np.take_along_axis(p, ids, axis=-1), flame.topk_probs, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.exp(trace.logits.astype(np.float64)).sum(axis=-1), 1.0, atol=1e-5)
    # The filled experts never outrank or tie the 6th recorded one, so top-6 of the filled logits is the record.
    missing = trace.logits.copy()
    np.put_along_axis(missing, ids, -np.inf, axis=-1)
    assert (missing.max(axis=-1) < np.take_along_axis(trace.logits, ids, axis=-1).min(axis=-1)).all()
    top6 = np.argsort(-trace.logits, axis=-1, kind="stable")[..., :6]
    np.testing.assert_array_equal(np.sort(top6, axis=-1), np.sort(ids, axis=-1))
    np.testing.assert_array_equal(flame.filled(fill).logits, trace.logits)


def _missing_probs(trace: RoutingTrace, ids: np.ndarray) -> np.ndarray:
    """float64 ``[layers, tokens, E - k]``: each token's filled probabilities, in expert order."""
    keep = np.ones(trace.logits.shape, dtype=bool)
    np.put_along_axis(keep, ids, False, axis=-1)
    p = np.exp(trace.logits.astype(np.float64))
    return p[keep].reshape(*trace.logits.shape[:2], -1)


def test_uniform_fill_spreads_the_remaining_mass_evenly(flame: TopKTrace) -> None:
    ids = flame.topk_ids.astype(np.int64)
    q = _missing_probs(flame.filled("uniform"), ids)
    remaining = 1.0 - flame.topk_probs.astype(np.float64).sum(axis=-1)
    np.testing.assert_allclose(q, np.broadcast_to((remaining / 58)[..., None], q.shape), rtol=1e-6)


def test_tail_fill_is_geometric_and_favours_no_expert(flame: TopKTrace) -> None:
    ids = flame.topk_ids.astype(np.int64)
    trace = flame.filled("tail")
    q = -np.sort(-_missing_probs(trace, ids), axis=-1)
    kth = flame.topk_probs.astype(np.float64).min(axis=-1)
    ratios = q[..., 1:] / q[..., :-1]
    rho = q[..., 0] / kth  # the first place of the tail is p_k * rho
    np.testing.assert_allclose(ratios, np.broadcast_to(rho[..., None], ratios.shape), rtol=1e-4)
    assert 0.8 < np.median(rho) < 1.0
    # Each expert is the largest missing one about equally often when it is missing: a hash, not its id, decides.
    missing = np.ones(trace.logits.shape, dtype=bool)
    np.put_along_axis(missing, ids, False, axis=-1)
    first = np.where(missing, trace.logits, -np.inf).argmax(axis=-1)
    share = np.bincount(first.ravel(), minlength=64) / missing.sum(axis=(0, 1))
    assert share.min() > 0.5 / 58 and share.max() < 1.5 / 58


def test_floor_fill_puts_as_many_experts_as_the_mass_allows_at_half_the_kth(flame: TopKTrace) -> None:
    ids = flame.topk_ids.astype(np.int64)
    q = _missing_probs(flame.filled("floor"), ids)
    kth = flame.topk_probs.astype(np.float64).min(axis=-1)[..., None]
    remaining = 1.0 - flame.topk_probs.astype(np.float64).sum(axis=-1)[..., None]
    spread = remaining / 58
    at_floor = np.isclose(q, FLOOR_FACTOR * kth, rtol=1e-5).sum(axis=-1)
    floor = FLOOR_FACTOR * kth[..., 0]
    expected = np.where(spread[..., 0] >= floor, 0, np.floor(remaining[..., 0] / floor))
    np.testing.assert_array_equal(at_floor, expected)
    # Where the mass allows more than the floor, every missing expert is at the (higher) even share.
    flat = spread[..., 0] >= FLOOR_FACTOR * kth[..., 0]
    assert flat.any() and (~flat).any()
    np.testing.assert_allclose(q[flat], np.broadcast_to(spread[flat], q[flat].shape), rtol=1e-5)
    assert (q <= FLOOR_FACTOR * kth * (1 + 1e-5))[~flat].all()


def _small_topk(probs: list[list[float]], ids: list[list[int]] | None = None) -> tuple[np.ndarray, np.ndarray]:
    p = np.array([probs], dtype=np.float32)
    i = np.array([ids if ids is not None else [list(range(len(row))) for row in probs]], dtype=np.int16)
    return i, p


@pytest.mark.parametrize("fill", FILL_STRATEGIES)
def test_fill_by_hand(fill: FillStrategy) -> None:
    ids, probs = _small_topk([[0.5, 0.2], [0.6, 0.3]], [[3, 1], [0, 4]])
    logits = fill_logits(ids, probs, 5, fill=fill, sequence_ids=np.array([0, 0]),
                         positions=np.array([0, 1]), layer_ids=(7,))
    p = np.exp(logits.astype(np.float64))[0]
    np.testing.assert_allclose(p.sum(axis=-1), 1.0, atol=1e-6)
    np.testing.assert_allclose(p[0, [3, 1]], [0.5, 0.2], atol=1e-7)
    missing = p[0, [0, 2, 4]]
    if fill == "uniform":
        np.testing.assert_allclose(missing, 0.1, rtol=1e-6)
    elif fill == "tail":  # 0.2 * (rho + rho**2 + rho**3) = 0.3
        ordered = np.sort(missing)[::-1]
        rho = ordered[0] / 0.2
        np.testing.assert_allclose(ordered, 0.2 * rho ** np.arange(1, 4), rtol=1e-5)
    else:  # r / m = 0.1 >= 0.5 * p_k = 0.1: the even share
        np.testing.assert_allclose(missing, 0.1, rtol=1e-6)
    if fill == "floor":  # second token: r = 0.1 < 3 * 0.15, so none fits at 0.15 and all share 0.1
        np.testing.assert_allclose(p[1, [1, 2, 3]], 0.1 / 3, rtol=1e-5)


@pytest.mark.parametrize("fill", FILL_STRATEGIES)
def test_fill_of_inconsistent_rounding_keeps_the_ranking(fill: FillStrategy) -> None:
    """Sums at or above 1 and remaining mass above (E - k) * p_k cannot come from a router, only from rounding:
    the logits stay finite and the recorded experts stay on top."""
    ids, probs = _small_topk([[0.7, 0.3000002], [0.4, 0.05]])
    logits = fill_logits(ids, probs, 5, fill=fill, sequence_ids=np.array([0, 1]), positions=np.array([0, 0]),
                         layer_ids=(0,))
    assert np.isfinite(logits).all()
    assert (logits[0, :, 2:].max(axis=-1) < logits[0, :, :2].min(axis=-1)).all()


def test_fill_is_a_function_of_the_token_names() -> None:
    ids, probs = _small_topk([[0.5, 0.2]] * 2, [[3, 1]] * 2)
    names: dict[str, Any] = {"sequence_ids": np.array([0, 1]), "positions": np.array([0, 0]), "layer_ids": (0,)}
    a = fill_logits(ids, probs, 5, fill="tail", **names)
    b = fill_logits(ids, probs, 5, fill="tail", **names)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a[0, 0], a[0, 1])  # two tokens with the same record get different tail orders
    with pytest.raises(ValueError, match="unknown fill"):
        fill_logits(ids, probs, 5, fill="zero", sequence_ids=np.array([0, 1]),  # type: ignore[arg-type]
                    positions=np.array([0, 0]),
                    layer_ids=(0,))


# --- save / load --------------------------------------------------------------------------------------------------


def _logits_trace(layers: int = 2, lengths: tuple[int, ...] = (5, 7, 4), experts: int = 8) -> RoutingTrace:
    """A small trace whose logits name their token: ``logits[l, t, e] = t + l / 10 + e / 1000``; sequences
    interleaved and stored out of position order, as real files may be."""
    seq = np.concatenate([np.full(n, s) for s, n in enumerate(lengths)])
    pos = np.concatenate([np.arange(n)[::-1] for n in lengths])
    order = np.random.default_rng(1).permutation(seq.size)
    seq, pos = seq[order], pos[order]
    t, layer, e = np.meshgrid(np.arange(seq.size), np.arange(layers), np.arange(experts), indexing="ij")
    logits = (t + layer / 10 + e / 1000).transpose(1, 0, 2).astype(np.float32)
    return RoutingTrace(
        name="toy", source="test", logits=logits, sequence_ids=seq.astype(np.int64), positions=pos.astype(np.int64),
        layer_ids=tuple(range(3, 3 + layers)), license="CC0-1.0", model="toy-moe", notes="made up",
    )


def test_round_trip_logits_form(tmp_path: Path) -> None:
    trace = _logits_trace()
    loaded = load_trace(save_trace(trace, tmp_path / "t.npz"))
    np.testing.assert_array_equal(loaded.logits, trace.logits)
    np.testing.assert_array_equal(loaded.sequence_ids, trace.sequence_ids)
    np.testing.assert_array_equal(loaded.positions, trace.positions)
    assert loaded.layer_ids == trace.layer_ids and loaded.recorded_top_k is None and loaded.fill is None
    assert (loaded.name, loaded.source, loaded.license, loaded.model, loaded.notes) == (
        "toy", "test", "CC0-1.0", "toy-moe", "made up")
    half = load_trace(save_trace(trace, tmp_path / "h.npz", logits_dtype="float16"))
    assert half.logits.dtype == np.float32
    np.testing.assert_allclose(half.logits, trace.logits, rtol=1e-3)


@pytest.mark.parametrize("fill", FILL_STRATEGIES)
def test_round_trip_topk_form(flame: TopKTrace, fill: FillStrategy, tmp_path: Path) -> None:
    filled = flame.filled(fill)
    path = save_trace(filled, tmp_path / "f.npz")  # a filled trace is stored as its recorded top-k only
    with np.load(path) as npz:
        assert "logits" not in npz.files
        np.testing.assert_array_equal(npz["topk_ids"], flame.topk_ids)
        np.testing.assert_allclose(npz["topk_probs"], flame.topk_probs, rtol=1e-5)
    again = load_trace(path, fill=fill)
    # The stored probabilities come back to float32 rounding, not bit for bit, and floor's count of experts at
    # the floor jumps with them near a threshold; either moves only probabilities far below 1e-6.
    np.testing.assert_allclose(np.exp(again.logits.astype(np.float64)), np.exp(filled.logits.astype(np.float64)),
                               rtol=0, atol=1e-6)
    assert again.recorded_top_k == 6 and again.fill == fill and again.notes == flame.notes


def _write(path: Path, **arrays: Any) -> Path:
    with path.open("wb") as handle:
        np.savez_compressed(handle, **arrays)
    return path


def _good_arrays(form: str) -> dict[str, np.ndarray]:
    meta = {"format_version": 1, "name": "x", "source": "s", "license": "l", "model": "m", "notes": "",
            "num_experts": 8}
    arrays = {
        "sequence_ids": np.array([0, 0, 1], dtype=np.int32),
        "positions": np.array([0, 1, 0], dtype=np.int32),
        "layer_ids": np.array([0, 1], dtype=np.int32),
        "meta": np.array(json.dumps(meta)),
    }
    if form == "logits":
        arrays["logits"] = np.zeros((2, 3, 8), dtype=np.float32)
    else:
        arrays["topk_ids"] = np.tile(np.array([[0, 1]], dtype=np.int16), (2, 3, 1))
        arrays["topk_probs"] = np.full((2, 3, 2), 0.3, dtype=np.float32)
    return arrays


@pytest.mark.parametrize("form", ["logits", "topk"])
def test_good_minimal_files_load(form: str, tmp_path: Path) -> None:
    trace = load_trace(_write(tmp_path / "ok.npz", **_good_arrays(form)))
    assert trace.logits.shape == (2, 3, 8)


@pytest.mark.parametrize(
    ("form", "change", "named"),
    [
        ("logits", {"meta": None}, "'meta'"),
        ("logits", {"positions": None}, "'positions'"),
        ("logits", {"sequence_ids": None}, "'sequence_ids'"),
        ("logits", {"layer_ids": None}, "'layer_ids'"),
        ("logits", {"logits": None}, "'logits'"),
        ("topk", {"topk_probs": None}, "'topk_probs'"),
        ("topk", {"topk_ids": None}, "'topk_ids'"),
        ("logits", {"positions": np.array([0, 1], dtype=np.int32)}, "'positions'"),
        ("logits", {"positions": np.array([0, 0, 0], dtype=np.int32)}, "'positions'"),
        ("logits", {"logits": np.zeros((3, 8), dtype=np.float32)}, "'logits'"),
        ("logits", {"logits": np.zeros((2, 3, 8), dtype=np.float64)}, "'logits'"),
        ("logits", {"logits": np.zeros((2, 3, 6), dtype=np.float32)}, "'logits'"),
        ("logits", {"logits": np.full((2, 3, 8), np.nan, dtype=np.float32)}, "'logits'"),
        ("logits", {"layer_ids": np.array([0], dtype=np.int32)}, "'layer_ids'"),
        ("topk", {"topk_probs": np.full((2, 3, 3), 0.3, dtype=np.float32)}, "'topk_probs'"),
        ("topk", {"topk_probs": np.full((2, 3, 2), 0.7, dtype=np.float32)}, "'topk_probs'"),
        ("topk", {"topk_ids": np.full((2, 3, 2), 9, dtype=np.int16)}, "'topk_ids'"),
        ("topk", {"topk_ids": np.zeros((2, 3, 2), dtype=np.int16)}, "'topk_ids'"),
        ("topk", {"logits": np.zeros((2, 3, 8), dtype=np.float32)}, "'logits'"),
        ("logits", {"meta": np.array("{not json")}, "'meta'"),
        ("logits", {"meta": np.array(json.dumps({"format_version": 1, "name": "x"}))}, "'meta'"),
        ("logits", {"extra": np.zeros(1)}, "extra"),
    ],
)
def test_bad_files_raise_input_error_naming_file_and_array(
    form: str, change: dict[str, np.ndarray | None], named: str, tmp_path: Path
) -> None:
    arrays = _good_arrays(form)
    for key, value in change.items():
        if value is None:
            del arrays[key]
        else:
            arrays[key] = value
    path = _write(tmp_path / "bad.npz", **arrays)
    with pytest.raises(InputError) as info:
        load_trace(path)
    assert info.value.where == str(path)
    assert named in info.value.problem


def test_unreadable_files_raise_input_error(tmp_path: Path) -> None:
    for path in (tmp_path / "absent.npz", tmp_path / "text.npz"):
        if path.name == "text.npz":
            path.write_text("not a zip")
        with pytest.raises(InputError) as info:
            load_trace(path)
        assert info.value.where == str(path)


def _write_flame_csv(folder: Path, layer: int, probs: np.ndarray) -> Path:
    frame = pd.DataFrame(probs, columns=[f"expert_{e}" for e in range(64)])
    frame.insert(0, "token_id", np.arange(len(probs)))
    frame.insert(0, "layer_id", 0)
    path = folder / f"layer{layer:02d}.csv"
    frame.to_csv(path, index=False, float_format="%.6f")
    return path


def test_flame_importer_rejects_bad_folders(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no layerNN.csv"):
        read_flame_csv_dir(tmp_path)
    probs = np.zeros((16, 64))
    probs[:, :6] = 0.1
    _write_flame_csv(tmp_path, 2, probs)
    assert read_flame_csv_dir(tmp_path).topk_ids.shape == (1, 16, 6)
    probs[5, 5] = 0.0
    bad = _write_flame_csv(tmp_path, 3, probs)
    with pytest.raises(InputError) as info:
        read_flame_csv_dir(tmp_path)
    assert info.value.where == f"{bad}:7"  # header is line 1, row 5 is line 7
    probs[5, 5] = 0.1
    short = _write_flame_csv(tmp_path, 3, probs[:8])
    with pytest.raises(InputError) as info:
        read_flame_csv_dir(tmp_path)
    assert info.value.where == str(short)
    short.write_text("layer_id,token_id,expert_0\n0,0,1.0\n")
    with pytest.raises(InputError, match="columns"):
        read_flame_csv_dir(tmp_path)


# --- replay -------------------------------------------------------------------------------------------------------


def _token_of(logits: np.ndarray) -> np.ndarray:
    """The trace token each row of ``_logits_trace`` replay output came from (layer 0's integer part)."""
    return np.rint(logits[0, :, 0]).astype(np.int64)


def test_sequences_are_in_position_order() -> None:
    trace = _logits_trace()
    sequences = trace.sequences()
    assert sorted(s.size for s in sequences) == [4, 5, 7]
    for tokens in sequences:
        assert np.unique(trace.sequence_ids[tokens]).size == 1
        np.testing.assert_array_equal(trace.positions[tokens], np.arange(tokens.size))
    first = [int(trace.sequence_ids[s[0]]) for s in sequences]
    appearance = list(dict.fromkeys(trace.sequence_ids.tolist()))
    assert first == appearance


def test_replay_is_deterministic_per_token_whatever_the_batch() -> None:
    source = TraceReplayRouting(_logits_trace(), seed=3)
    requests = np.array([0, 1, 2, 3, 4, 5, 6, 7, 1000, -4])
    positions = np.array([0, 3, 9, 1, 2, 40, 7, 0, 5, 11])
    full = source.logits(requests, positions)
    assert full.dtype == np.float32 and full.shape == (2, 10, 8)
    order = np.random.default_rng(0).permutation(10)
    np.testing.assert_array_equal(source.logits(requests[order], positions[order]), full[:, order])
    for i in range(10):
        np.testing.assert_array_equal(source.logits(requests[i : i + 1], positions[i : i + 1])[:, 0], full[:, i])
    again = TraceReplayRouting(_logits_trace(), seed=3)
    np.testing.assert_array_equal(again.logits(requests, positions), full)
    assert source.logits(np.array([], dtype=np.int64), np.array([], dtype=np.int64)).shape == (2, 0, 8)


def test_replay_seeds_change_the_mapping() -> None:
    trace = _logits_trace()
    requests = np.arange(64)
    zeros = np.zeros(64, dtype=np.int64)
    a = TraceReplayRouting(trace, seed=0).recorded_tokens(requests, zeros)
    b = TraceReplayRouting(trace, seed=1).recorded_tokens(requests, zeros)
    assert not np.array_equal(a, b)


def test_replay_follows_one_sequence_in_order_and_wraps() -> None:
    trace = _logits_trace()
    source = TraceReplayRouting(trace, seed=5)
    lengths = {int(trace.sequence_ids[s[0]]): s.size for s in trace.sequences()}
    used = []
    for request in range(12):
        tokens = _token_of(source.logits(np.full(30, request), np.arange(30)))
        sequence = np.unique(trace.sequence_ids[tokens])
        assert sequence.size == 1  # one recorded sequence per request
        n = lengths[int(sequence[0])]
        recorded = trace.positions[tokens]
        np.testing.assert_array_equal(recorded, (recorded[0] + np.arange(30)) % n)  # consecutive, wrapping
        np.testing.assert_array_equal(tokens[:n], tokens[n : 2 * n])
        used.append(int(sequence[0]))
    # Requests 0 .. S-1 use every sequence once, and the assignment repeats with period S.
    assert sorted(used[:3]) == [0, 1, 2] and used[3:6] == used[:3]
    # Requests sharing a sequence start at different offsets (with 3 sequences, 12 requests: 4 per sequence).
    starts = _token_of(source.logits(np.arange(12), np.zeros(12, dtype=np.int64)))
    assert np.unique(starts).size > 3


def test_replay_maps_layers_and_checks_experts() -> None:
    np.testing.assert_array_equal(layer_map(16, 8), np.repeat(np.arange(8), 2))
    np.testing.assert_array_equal(layer_map(4, 8), [0, 2, 4, 6])
    np.testing.assert_array_equal(layer_map(8, 8), np.arange(8))
    np.testing.assert_array_equal(layer_map(3, 8), [0, 2, 5])
    trace = _logits_trace(layers=2)
    source = TraceReplayRouting(trace, seed=0, num_moe_layers=5, num_experts=8)
    assert source.num_moe_layers == 5 and source.num_experts == 8
    out = source.logits(np.arange(6), np.arange(6))
    assert out.shape == (5, 6, 8)
    direct = TraceReplayRouting(trace, seed=0).logits(np.arange(6), np.arange(6))
    for i, trace_layer in enumerate(layer_map(5, 2)):
        np.testing.assert_array_equal(out[i], direct[trace_layer])
    with pytest.raises(ValueError, match="expert"):
        TraceReplayRouting(trace, seed=0, num_experts=16)
    with pytest.raises(ValueError):
        layer_map(0, 8)


def test_flame_replay_walks_consecutive_recorded_tokens(flame: TopKTrace) -> None:
    trace = flame.filled("tail")
    source = TraceReplayRouting(trace, seed=11, num_moe_layers=48, num_experts=64)
    assert source.num_sequences == 8
    requests = np.repeat(np.arange(40), 300)
    positions = np.tile(np.arange(300), 40)
    tokens = source.recorded_tokens(requests, positions).reshape(40, 300)
    sequence = trace.sequence_ids[tokens]
    assert (sequence == sequence[:, :1]).all()
    step = np.diff(trace.positions[tokens], axis=1)
    assert np.isin(step, [1, -255]).all() and (step == -255).sum(axis=1).max() == 2  # wraps every 256 tokens
    out = source.logits(requests[:300], positions[:300])
    assert out.shape == (48, 300, 64)
    np.testing.assert_array_equal(out[47], trace.logits[7][tokens[0]])
