"""A trained model on disk: its weights with the shape, recipe, corpus hashes and training record that made it.

Checkpoints are not committed (tens of MB); the recipe and seed they record are, so anyone with a GPU can
re-create them (``lynxsim quality train``). Evaluation reads the corpus hashes to refuse held-out text that is
not the text the model was trained beside.
"""

from __future__ import annotations

import pickle
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from lynxsim.errors import InputError
from lynxsim.quality.model import MoELanguageModel
from lynxsim.quality.shapes import MoEShape, TrainConfig

FORMAT = "lynxsim-quality-checkpoint-1"


@dataclass
class Checkpoint:
    """A model and everything that says how it was made. ``record`` holds the training log's summary
    (wall time, final losses, held-out loss per source, versions, device)."""

    model: MoELanguageModel
    train: TrainConfig
    corpus: dict[str, str]  # source -> SHA-256
    record: dict[str, Any]


def save_checkpoint(checkpoint: Checkpoint, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "format": FORMAT,
            "shape": asdict(checkpoint.model.shape),
            "train": asdict(checkpoint.train),
            "corpus": checkpoint.corpus,
            "record": checkpoint.record,
            "state_dict": {k: v.detach().cpu() for k, v in checkpoint.model.state_dict().items()},
        },
        path,
    )
    return path


def load_checkpoint(path: Path, device: torch.device) -> Checkpoint:
    """Read a checkpoint written by ``save_checkpoint``; ``InputError`` for a missing or foreign file."""
    if not path.is_file():
        raise InputError(str(path), "no such checkpoint (lynxsim quality train writes one)")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        raise InputError(str(path), f"not a readable checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise InputError(str(path), f"not a lynxsim quality checkpoint (format {FORMAT})")
    model = MoELanguageModel(MoEShape(**data["shape"]))
    model.load_state_dict(data["state_dict"])
    return Checkpoint(model.to(device).eval(), TrainConfig(**data["train"]), dict(data["corpus"]), dict(data["record"]))
