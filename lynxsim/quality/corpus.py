"""The training and held-out text: a prose corpus and Python source code, as bytes, split deterministically.

Two sources, so that the routers see two kinds of text and learn to route them differently:

* prose: tinyshakespeare (github.com/karpathy/char-rnn, ``data/tinyshakespeare/input.txt``; public domain),
  kept in ``../shared/data/corpus/`` beside the repository;
* code: the ``.py`` files of the running Python's standard library (``sysconfig.get_paths()["stdlib"]``),
  collected in sorted path order, tests and third-party packages left out (``EXCLUDED_DIRS``). Every machine
  has one, so nothing is downloaded; the checkpoint records which Python's (version and SHA-256 of the bytes),
  and evaluation refuses a corpus whose hash differs from the one the checkpoint was trained on.

Each source is split at fixed fractions of its length: the first ``1 - HELD_OUT_FRACTION`` trains, the rest is
held out and halved into a calibration part (routing traces, the calibration of ``skip`` and ``prune``) and an
evaluation part (the quality measurements). For the code the held-out part is the last files in path order, so
no held-out file was seen in training.
"""

from __future__ import annotations

import hashlib
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lynxsim.errors import InputError

DEFAULT_TEXT_PATH = Path(__file__).resolve().parents[3] / "shared" / "data" / "corpus" / "tinyshakespeare_input.txt"
"""``../shared/data/corpus/tinyshakespeare_input.txt`` beside the repository (README, Data)."""

EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})
"""Folders of the standard library whose files are not collected: test suites (much generated or repetitive
data) and installed third-party packages (not the standard library, and different on every machine)."""

HELD_OUT_FRACTION = 0.1

TRACE_SEQUENCES = 32
TRACE_LENGTH_TOKENS = 256
"""Calibration-part windows of a routing trace: 32 of 256 tokens (3.6 MB at 64 experts and 6 layers, float16)."""

CALIBRATION_SEQUENCES = 16
"""Windows of ``TRACE_LENGTH_TOKENS`` tokens (the first of the trace's) on which ``skip`` and ``prune`` are
calibrated before evaluation: 4,096 tokens."""
SOURCES = ("text", "code")


@dataclass(frozen=True)
class SourceSplit:
    """One source's bytes (uint8 arrays) in its three parts, and the SHA-256 of the whole."""

    train: np.ndarray
    calibration: np.ndarray
    evaluation: np.ndarray
    sha256: str
    origin: str  # where the bytes came from, for the checkpoint's record


@dataclass(frozen=True)
class Corpus:
    """The two sources, ``text`` and ``code``."""

    text: SourceSplit
    code: SourceSplit

    def source(self, name: str) -> SourceSplit:
        return self.text if name == "text" else self.code

    def fingerprint(self) -> dict[str, str]:
        """SHA-256 of each source: what a checkpoint records and evaluation checks."""
        return {"text": self.text.sha256, "code": self.code.sha256}


def stdlib_dir() -> Path:
    """The running Python's standard-library folder."""
    return Path(sysconfig.get_paths()["stdlib"])


def collect_code(root: Path) -> bytes:
    """Every ``.py`` file under ``root`` outside ``EXCLUDED_DIRS``, in sorted relative-path order, each preceded
    by a ``# file: <path>`` line (so file boundaries are visible in the text) and separated by a blank line."""
    if not root.is_dir():
        raise InputError(str(root), "no such folder of Python sources")
    paths = sorted(
        path.relative_to(root)
        for path in root.rglob("*.py")
        if path.is_file() and not EXCLUDED_DIRS.intersection(path.relative_to(root).parts[:-1])
    )
    if not paths:
        raise InputError(str(root), "holds no .py files")
    return b"".join(
        b"# file: " + path.as_posix().encode() + b"\n" + (root / path).read_bytes() + b"\n\n" for path in paths
    )


def split_source(data: bytes, origin: str, min_part_bytes: int) -> SourceSplit:
    """Split ``data`` into train / calibration / evaluation parts (module docstring); each held-out part must
    hold at least ``min_part_bytes`` (``InputError`` naming ``origin`` otherwise)."""
    array = np.frombuffer(data, dtype=np.uint8).copy()  # writable: torch.from_numpy shares it without a copy
    train_end = round(array.size * (1.0 - HELD_OUT_FRACTION))
    calibration_end = train_end + (array.size - train_end) // 2
    split = SourceSplit(
        train=array[:train_end],
        calibration=array[train_end:calibration_end],
        evaluation=array[calibration_end:],
        sha256=hashlib.sha256(data).hexdigest(),
        origin=origin,
    )
    if min(split.calibration.size, split.evaluation.size) < min_part_bytes:
        raise InputError(origin, f"too small: each held-out part needs {min_part_bytes} bytes, got "
                         f"{min(split.calibration.size, split.evaluation.size)}")
    return split


def load_corpus(
    text_path: Path = DEFAULT_TEXT_PATH, code_root: Path | None = None, *, min_part_bytes: int = 1
) -> Corpus:
    """The prose file and the Python sources under ``code_root`` (default: this Python's standard library)."""
    if not text_path.is_file():
        raise InputError(str(text_path), "no such text corpus file (see README, Data)")
    root = code_root if code_root is not None else stdlib_dir()
    code_origin = f"{root} (Python {sys.version.split()[0]})" if code_root is None else str(root)
    return Corpus(
        text=split_source(text_path.read_bytes(), str(text_path), min_part_bytes),
        code=split_source(collect_code(root), code_origin, min_part_bytes),
    )


def windows(data: np.ndarray, length: int, count: int) -> np.ndarray:
    """uint8 ``[count, length]``: the first ``count`` non-overlapping windows of ``length`` bytes of ``data``
    (held-out sequences: fixed, so every policy and batch size sees the same tokens)."""
    if count * length > data.size:
        raise InputError("held-out text", f"{count} windows of {length} bytes need {count * length} bytes, "
                         f"the part holds {data.size}")
    return data[: count * length].reshape(count, length)
