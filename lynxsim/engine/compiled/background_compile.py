"""One numba function compiled in a second process while this one compiles the engine's loop, and the loop's pointer
to it: a cold start on two cores.

A cold start (an empty numba cache: a new machine, a fresh clone, an edited kernel) compiles the loop
(``kernel.simulate``) and the exact routing it calls (``routing.route``), about 10 s each on this project's 2-core
machine. numba compiles in Python under one lock, so one process compiles them one after the other. The loop calls
the routing through a function pointer (``routing.route_function``): neither's compilation needs the other's code,
and a child process compiles the routing into numba's on-disk cache while this process compiles the loop, then
this process loads it from there (0.02 s in a cold quickstart; measured). The child starts only where the
routing is not cached; if it fails, this process compiles the routing itself, as it would without it.

numba's cache has no public "is this signature cached" query: ``is_cached`` reads its index through the
dispatcher's cache object (numba's ``Cache._index_key`` and its index file), and answers True (no child: the
one-process path) where that changes shape in a later numba.
"""

from __future__ import annotations

import atexit
import importlib
import pickle
import subprocess
import sys
from typing import Any

import numba.experimental.function_type  # noqa: F401  (numba's typeof of WrapperAddressProtocol objects)
from numba.core.types import WrapperAddressProtocol


def is_cached(dispatcher: Any, args: tuple[Any, ...]) -> bool:
    """Whether numba's on-disk cache of ``dispatcher`` (a ``cache=True`` function) holds its compilation for the
    argument types ``args`` on this machine (True where that cannot be told)."""
    try:
        cache = dispatcher._cache
        key = cache._index_key(args, dispatcher.targetctx.codegen())
        return key in cache._cache_file._load_index()
    except (AttributeError, TypeError):
        return True


def start(module: str, name: str, args: tuple[Any, ...]) -> subprocess.Popen[bytes] | None:
    """A child process compiling ``module.name`` (a numba dispatcher) for ``args`` into numba's cache, or None
    where it could not start. It is killed when this process exits first."""
    if not sys.executable:  # an embedded interpreter: nothing to start a child with
        return None
    try:
        child = subprocess.Popen(
            [sys.executable, "-m", __name__], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    except OSError:
        return None
    assert child.stdin is not None
    try:
        child.stdin.write(pickle.dumps((module, name, args)))
        child.stdin.close()
    except OSError:  # it died on start: this process compiles instead
        child.kill()
        return None
    atexit.register(_stop, child)
    return child


def _stop(child: subprocess.Popen[bytes]) -> None:
    if child.poll() is None:
        child.kill()


class FunctionPointer(WrapperAddressProtocol):
    """numba's first-class function protocol for the ``cache=True`` function ``module.name`` at ``signature``: a
    compiled function taking it as an argument is compiled against ``signature()`` alone and reads
    ``__wrapper_address__()`` each time it is called from Python, where the function must be compiled (loaded from
    numba's cache once the child compiling it has ended, or compiled here). The child starts with the pointer,
    where the function is not cached."""

    def __init__(self, module: str, name: str, signature: Any) -> None:
        self._function = getattr(importlib.import_module(module), name)
        self._signature = signature
        self._address = 0
        self._child = None if is_cached(self._function, signature.args) else start(module, name, signature.args)

    def signature(self) -> Any:
        return self._signature

    def __wrapper_address__(self) -> int:
        if not self._address:
            if self._child is not None:
                self._child.wait()
                self._child = None
            self._function.compile(self._signature.args)
            result = self._function.overloads[self._signature.args]
            self._address = result.library.get_pointer_to_function(result.fndesc.llvm_cfunc_wrapper_name)
        return self._address


def main() -> None:
    """The child's work: the pickled ``(module, name, args)`` from standard input, compiled (numba saves it)."""
    module, name, args = pickle.loads(sys.stdin.buffer.read())
    getattr(importlib.import_module(module), name).compile(args)


if __name__ == "__main__":
    main()
