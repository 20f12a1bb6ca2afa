"""Importer for FLAME-MoE router traces in the CSV layout of DynaNDE-Simulator's samples.

FLAME-MoE (Kang, Yu and Xiong, arXiv 2505.20225) logs, for every token of its pretraining batches, the top-6 of
64 routed experts each MoE layer chose and their router softmax probabilities (Hugging Face dataset
CMU-FLAME/FLAME-MoE-Traces, Apache-2.0; its 2 always-on shared experts are not logged). The sample this module
reads, ``layerNN.csv`` for MoE layers 02..09 of FLAME-MoE-290M, has one row per token: ``layer_id`` (always 0),
``token_id`` (0 .. T-1, the same order in every file), then ``expert_0 .. expert_63``: the probability of each of
the 6 selected experts, 0 for the other 58, printed with 6 decimals. Its first row of layer 02 equals the
example row the dataset card shows for ``flame-moe-290m/actives/iter_5473/layer_02.parquet``, so the sample is
the first 2,048 rows of the final (iteration 5473) checkpoint's capture.

Token layout: rows are position-major, ``token_id = position * 8 + sequence``
--------------------------------------------------------------------------
Neither the dataset card nor the CSVs say which rows belong to one sequence; a sequence-major reading
(``sequence = token_id // 64``, "32 sequences x 64 tokens") is not what the routing shows. Mean number of
top-6 experts (of 6) that rows ``i`` and ``i + d`` share, over the 8 layers and all rows:

* ``d`` = 1 to 7: 0.54-0.63; ``d`` = 8: 1.28; 16: 0.88; 24: 0.76; 32: 0.70; 64: 0.69;
* rows in different lanes ``i mod 8``: 0.58 (what unrelated tokens share).

So a row is related to the rows 8, 16, 24, ... after it, and the relation decays with the multiple of 8 as
the similarity of neighbouring tokens of one text does, while the next row (``d = 1``, consecutive under a
sequence-major reading) is barely above unrelated. Within a lane, tokens ``p`` positions apart share 1.28
experts at ``p = 1``, 0.88 at 2, 0.70 at 5-8, 0.64 at 33-64 and still 0.61 at 129-255, against 0.57-0.59 for
rows of two lanes at the same distances, and the top-1 expert repeats at ``d = 8`` for 8.4% of pairs against
2.4% at ``d = 1`` and 2.0% by chance. Nothing changes at the boundaries a 64- or 32-token sequence length would
put inside a lane (1.17 and 1.23 shared experts across them, 1.28 elsewhere). Each lane is therefore one
sequence of 2,048 / 8 = 256 tokens, row ``t`` = position ``t // 8`` of sequence ``t % 8``. That is the layout
of Megatron-LM, which FLAME-MoE trains with: activations are sequence-first ``[s, b, h]``, so flattening a
micro-batch of ``b`` sequences puts position ``p`` of sequence ``q`` at row ``p * b + q``; here ``b = 8``.
``num_sequences`` selects ``b`` for captures made with another micro-batch size.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from lynxsim.errors import InputError
from lynxsim.routing.trace import RoutingTrace
from lynxsim.routing.trace_format import DEFAULT_FILL, FillStrategy, TopKTrace, save_trace

FLAME_NUM_SEQUENCES = 8
"""Sequences interleaved in the rows of the FLAME-MoE sample (its micro-batch size; see the module docstring)."""

FLAME_NUM_EXPERTS = 64

_LAYER_FILE = re.compile(r"layer(\d+)\.csv")


def read_flame_csv_dir(
    path: str | Path,
    *,
    num_sequences: int = FLAME_NUM_SEQUENCES,
    name: str = "flame-moe-290m",
    model: str = "FLAME-MoE-290M (iteration 5473)",
) -> TopKTrace:
    """The top-k recording in a folder of FLAME-MoE ``layerNN.csv`` files, as stored (no filled logits).

    Row ``t`` becomes position ``t // num_sequences`` of sequence ``t % num_sequences``; ``NN`` becomes the
    layer id. Every row of every file must keep the same number k of nonzero probabilities (6 for FLAME-MoE),
    which become its top-k, in descending order (ties: lower expert id). Bad folders and files raise
    ``InputError`` naming the file (and line).
    """
    folder = Path(path)
    if not folder.is_dir():
        raise InputError(str(folder), "no such folder of FLAME-MoE layerNN.csv files")
    files = sorted(
        (int(match.group(1)), entry)
        for entry in folder.iterdir()
        if (match := _LAYER_FILE.fullmatch(entry.name)) is not None
    )
    if not files:
        raise InputError(str(folder), "holds no layerNN.csv files")
    if isinstance(num_sequences, bool) or not isinstance(num_sequences, int) or num_sequences < 1:
        raise ValueError(f"num_sequences must be a positive integer, got {num_sequences!r}")

    ids_per_layer, probs_per_layer = [], []
    token_ids: np.ndarray | None = None
    top_k: int | None = None
    for _, csv_path in files:
        tokens, probs = _read_layer_csv(csv_path)
        if token_ids is None:
            token_ids = tokens
            if not np.array_equal(tokens, np.arange(tokens.size)):
                raise InputError(str(csv_path), "column token_id must run 0, 1, 2, ... in row order")
            if tokens.size % num_sequences:
                raise InputError(
                    str(csv_path), f"{tokens.size} rows do not split into {num_sequences} interleaved sequences"
                )
        elif not np.array_equal(tokens, token_ids):
            raise InputError(str(csv_path), f"column token_id differs from {files[0][1].name}'s")
        nonzero = np.count_nonzero(probs, axis=1)
        top_k = int(nonzero[0]) if top_k is None else top_k
        bad = np.flatnonzero(nonzero != top_k)
        if bad.size:
            raise InputError(
                f"{csv_path}:{bad[0] + 2}", f"{nonzero[bad[0]]} nonzero expert probabilities, other rows have {top_k}"
            )
        ids = np.argsort(-probs, axis=1, kind="stable")[:, :top_k]
        ids_per_layer.append(ids)
        probs_per_layer.append(np.take_along_axis(probs, ids, axis=1))

    assert token_ids is not None
    try:
        return TopKTrace(
            name=name,
            source=(
                "Hugging Face dataset CMU-FLAME/FLAME-MoE-Traces, as sampled in the layerNN.csv files of "
                "Akash-N-Pai/DynaNDE-Simulator ('Sample routing traces/')"
            ),
            license="Apache-2.0",
            model=model,
            notes=(
                f"{', '.join(p.name for _, p in files)} from {folder.name}/: router softmax probabilities of the "
                f"top-{top_k} of {FLAME_NUM_EXPERTS} routed experts (2 always-on shared experts not logged); "
                f"row t is position t // {num_sequences} of sequence t % {num_sequences} "
                "(Megatron's sequence-first layout; see lynxsim/routing/flame.py)"
            ),
            num_experts=FLAME_NUM_EXPERTS,
            topk_ids=np.stack(ids_per_layer).astype(np.int16),
            topk_probs=np.stack(probs_per_layer).astype(np.float32),
            sequence_ids=token_ids % num_sequences,
            positions=token_ids // num_sequences,
            layer_ids=tuple(layer for layer, _ in files),
        )
    except ValueError as exc:
        raise InputError(str(folder), str(exc)) from None


def _read_layer_csv(csv_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``token_id`` (int64 ``[T]``) and the expert probabilities (float64 ``[T, 64]``) of one layer file."""
    where = str(csv_path)
    try:
        frame = pd.read_csv(csv_path, engine="pyarrow")
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise InputError(where, f"not a readable CSV file ({exc})") from None
    expected = ["layer_id", "token_id", *(f"expert_{e}" for e in range(FLAME_NUM_EXPERTS))]
    if list(frame.columns) != expected:
        raise InputError(where, f"columns must be layer_id, token_id, expert_0 .. expert_{FLAME_NUM_EXPERTS - 1}")
    if frame.empty:
        raise InputError(where, "has no rows")
    numeric = frame.apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    bad_rows = np.flatnonzero(~np.isfinite(numeric).all(axis=1))
    if bad_rows.size:
        raise InputError(f"{where}:{bad_rows[0] + 2}", "a value is missing or not a number")
    probs = numeric[:, 2:]
    bad_rows = np.flatnonzero(((probs < 0) | (probs > 1)).any(axis=1))
    if bad_rows.size:
        raise InputError(f"{where}:{bad_rows[0] + 2}", "expert probabilities must lie in [0, 1]")
    tokens = numeric[:, 1]
    if not np.array_equal(tokens, np.round(tokens)):
        raise InputError(where, "column token_id must hold integers")
    return tokens.astype(np.int64), probs


def load_flame_csv_dir(
    path: str | Path, *, fill: FillStrategy = DEFAULT_FILL, num_sequences: int = FLAME_NUM_SEQUENCES
) -> RoutingTrace:
    """A folder of FLAME-MoE ``layerNN.csv`` files as a ``RoutingTrace``, the 58 unrecorded logits per token
    filled in by ``fill`` (see ``lynxsim.routing.trace_format``)."""
    return read_flame_csv_dir(path, num_sequences=num_sequences).filled(fill)


def import_flame(
    src_dir: str | Path, dest_npz: str | Path, *, num_sequences: int = FLAME_NUM_SEQUENCES
) -> Path:
    """Convert a folder of FLAME-MoE ``layerNN.csv`` files to one lynxsim trace file (top-k form: the recorded
    ids and probabilities only); returns the path written. The data is Apache-2.0 and stays outside the
    repository: write it under ``../shared/data`` or a scratch folder, never into ``traces/``."""
    return save_trace(read_flame_csv_dir(src_dir, num_sequences=num_sequences), dest_npz)
