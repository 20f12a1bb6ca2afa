"""The one error type for bad user input.

Every module that reads something a user wrote (a config key, a data file, a command-line value) raises
``InputError`` with the place and the problem; the CLI turns it into one line on stderr and exit code 2,
so bad input never reaches the user as a traceback. A path the system refuses (an output folder that is a file,
read-only or under /proc) is reported the same way, whichever command met it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class InputError(Exception):
    """Bad user input: ``where`` names the key path or ``file:line``, ``problem`` says what is wrong."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where}: {problem}" if where else problem)
        self.where = where
        self.problem = problem


def exit_code(handler: Callable[[], int]) -> int:
    """Run a command's ``handler`` and return its exit code; bad input ends it with one line on stderr and exit
    code 2 (every command line of the project: ``lynxsim``, and the calibration and quality modules run alone)."""
    try:
        return int(handler())
    except InputError as exc:
        print(f"lynxsim: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a path the user named cannot be read or written: a file, a read-only folder, /proc
        print(f"lynxsim: error: {file_problem(exc)}", file=sys.stderr)
        return 2


def file_problem(exc: OSError) -> str:
    """An operating-system error on a file as one line: the path, then what the system said."""
    paths = [str(p) for p in (exc.filename, exc.filename2) if p is not None]
    reason = exc.strerror or str(exc)
    return f"{' -> '.join(paths)}: {reason}" if paths else reason
