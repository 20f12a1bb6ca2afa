"""Whether numba compiles, decided once per process: the engine's loop, the cost formulas and the routing kernels.

The simulator's per-iteration work (synthetic router logits, expert selection, counting) has a numpy
reference implementation and, for the hot cases, a numba kernel that computes the same result in one pass
without numpy's per-call overhead. The kernels live in their own modules (``*_kernels.py``) and are imported
on first use only: importing numba costs about 0.4 s, which a process that never routes a token (the CLI's
``models`` listing, plotting) should not pay. The engine's loop (``lynxsim.engine.compiled.kernel``) and the cost
formulas are written for numba and compiled through ``compiled``.

Set the environment variable ``LYNXSIM_NO_NUMBA`` (to anything but ``0``) before the first routing call to
run the numpy reference paths instead, and the loop and the formulas as the Python they are (to the same
numbers, much slower): for debugging, to check that both give the same numbers, or for a run too short to be
worth compiling.

numba is imported at LLVM optimization level 1 (``NUMBA_OPT``, numba's default 3) unless the environment sets
it: a cold start (empty numba cache) compiles the compiled engine's loop in less time, and the loop ran as fast
as at level 3 within the noise, with the same records (quickstart and benchmark S1, issue 17; level 0 ran 30x
slower). numba reads the variable when it is first imported, so the package sets it on import
(``lynxsim/__init__.py``): it applies only where numba was not imported yet.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from functools import cache
from types import ModuleType
from typing import Any, TypeVar

DISABLE_VARIABLE = "LYNXSIM_NO_NUMBA"

F = TypeVar("F", bound=Callable[..., Any])


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


def compiled(**options: Any) -> Callable[[F], F]:
    """``numba.njit(**options)`` where numba runs; the function itself, run as Python, where it does not."""

    def decorate(function: F) -> F:
        numba = kernels("numba")
        return function if numba is None else numba.njit(**options)(function)

    return decorate


def internal(**options: Any) -> Callable[[F], F]:
    """``compiled(**options)`` for a function that only compiled code calls (the engine loop's steps): numba then
    builds no CPython or C wrapper for it, which for the loop's dozen internal steps, each taking tuples of arrays,
    was 1.8 s of a cold start's 16 s of compilation (measured, quickstart). Python can call it only where numba is
    off."""
    return compiled(no_cpython_wrapper=True, no_cfunc_wrapper=True, **options)


def compiled_for(function: F, args: tuple[Any, ...]) -> F:
    """``function`` (a ``compiled`` one) as numba compiled it for the types of ``args``, to call with arguments of
    those types: numba's dispatcher types every argument on every call, which for the engine's loop (32 arguments,
    a first-class function's type rebuilt from its signature each time, ``routing.route_function``) made an entry
    that returns at once take 17.4 us, against 6.4 us through the compiled function (measured), and a caller
    entering thousands of times pays the typing once this way. Compiles it (or loads it from
    numba's cache) on first use; ``function`` itself where numba is off."""
    numba = kernels("numba")
    if numba is None:
        return function
    dispatcher: Any = function
    entry: F = dispatcher.compile(tuple(numba.typeof(a) for a in args))
    return entry
