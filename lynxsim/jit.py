"""Optional numba kernels: whether the compiled fast paths run, decided once per process.

The simulator's per-iteration work (synthetic router logits, expert selection, counting) has a numpy
reference implementation and, for the hot cases, a numba kernel that computes the same result in one pass
without numpy's per-call overhead. The kernels live in their own modules (``*_kernels.py``) and are imported
on first use only: importing numba costs about 0.4 s, which a process that never routes a token (the CLI's
``models`` listing, plotting) should not pay.

Set the environment variable ``LYNXSIM_NO_NUMBA`` (to anything but ``0``) before the first routing call to
run the numpy reference paths instead: for debugging, or to check that both give the same numbers.
"""

from __future__ import annotations

import importlib
import os
from functools import cache
from types import ModuleType

DISABLE_VARIABLE = "LYNXSIM_NO_NUMBA"


@cache
def kernels(module: str) -> ModuleType | None:
    """The kernel module ``module`` (dotted name), or ``None`` where the numpy path must run: numba is not
    importable, or ``LYNXSIM_NO_NUMBA`` is set. Cached, so the answer holds for the whole process."""
    if os.environ.get(DISABLE_VARIABLE, "") not in ("", "0"):
        return None
    try:
        import numba  # noqa: F401  (only whether it imports)
    except ImportError:
        return None
    return importlib.import_module(module)
