"""Open a recorded routing trace from whatever a user points at: a lynxsim ``.npz`` file or a FLAME-MoE folder."""

from __future__ import annotations

from pathlib import Path

from lynxsim.errors import InputError
from lynxsim.routing.flame import load_flame_csv_dir
from lynxsim.routing.trace import RoutingTrace
from lynxsim.routing.trace_format import DEFAULT_FILL, FillStrategy, load_trace


def open_trace(path: str | Path, *, fill: FillStrategy = DEFAULT_FILL, where: str = "") -> RoutingTrace:
    """A folder is read as FLAME-MoE ``layerNN.csv`` files, a file as lynxsim's trace format; ``where`` names the
    config key or argument the path came from, for the error when it does not exist."""
    path = Path(path)
    if path.is_dir():
        return load_flame_csv_dir(path, fill=fill)
    if path.is_file():
        return load_trace(path, fill=fill)
    raise InputError(where or str(path), f"{path} does not exist")
