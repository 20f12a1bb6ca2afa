"""Optional numba kernels: whether the compiled fast paths run, decided once per process.

The simulator's per-iteration work (synthetic router logits, expert selection, counting) has a numpy
reference implementation and, for the hot cases, a numba kernel that computes the same result in one pass
without numpy's per-call overhead. The kernels live in their own modules (``*_kernels.py``) and are imported
on first use only: importing numba costs about 0.4 s, which a process that never routes a token (the CLI's
``models`` listing, plotting) should not pay.

Set the environment variable ``LYNXSIM_NO_NUMBA`` (to anything but ``0``) before the first routing call to
run the numpy reference paths instead: for debugging, or to check that both give the same numbers.

numba is imported at LLVM optimization level 1 (``NUMBA_OPT``, numba's default 3) unless the environment sets
it: a cold start (empty numba cache) compiles the compiled engine's loop in less time, and the loop ran as fast
as at level 3 within the noise, with the same records (quickstart and benchmark S1, issue 17; level 0 ran 30x
slower). numba reads the variable when it is first imported: it applies only where numba was not imported yet.
"""

from __future__ import annotations

import importlib
import os
from functools import cache
from types import ModuleType

DISABLE_VARIABLE = "LYNXSIM_NO_NUMBA"
OPT_VARIABLE = "NUMBA_OPT"
DEFAULT_OPT = "1"


@cache
def kernels(module: str) -> ModuleType | None:
    """The kernel module ``module`` (dotted name), or ``None`` where the numpy path must run: numba is not
    importable, or ``LYNXSIM_NO_NUMBA`` is set. Cached, so the answer holds for the whole process."""
    if os.environ.get(DISABLE_VARIABLE, "") not in ("", "0"):
        return None
    os.environ.setdefault(OPT_VARIABLE, DEFAULT_OPT)
    try:
        import numba  # noqa: F401  (only whether it imports)
    except ImportError:
        return None
    return importlib.import_module(module)
