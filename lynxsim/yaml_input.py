"""Reading a user's YAML file and reporting what is wrong in it, the same way for every kind of file.

Experiments, hardware profiles, model files, routing profiles and kernel tables are all YAML mappings validated
by pydantic; a problem in any of them must reach the user as one line naming the file, the line where YAML can
tell it, and the key path, never as a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from lynxsim.errors import InputError

_BASE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
"""libyaml's safe loader where PyYAML was built with it: the same data and error marks, about ten times faster
than the pure-Python one on the hardware profile's kernel tables (read at the start of every run)."""


class _UniqueKeyLoader(_BASE_LOADER):  # type: ignore[misc,valid-type]
    """The safe loader, refusing a key written twice in one mapping: YAML lets the last one win silently, so a
    file that sets ``alpha`` twice would run with a value the user may not have meant."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                first = seen[key].start_mark.line + 1
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first written on line {first})", key_node.start_mark)
            if isinstance(key, (str, int, float, bool)):
                seen[key] = key_node
        return dict(super().construct_mapping(node, deep=deep))


_SAFE_LOADER = _UniqueKeyLoader


def read_yaml_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """The mapping a YAML file holds; ``what`` names the kind of file in messages ("hardware profile")."""
    return _parse(Path(path), what)[0]


def read_yaml_mapping_with_nodes(path: str | Path, what: str) -> tuple[dict[str, Any], yaml.Node]:
    """``read_yaml_mapping`` plus the composed node tree, whose marks give the line of every key."""
    data, node = _parse(Path(path), what, compose=True)
    assert node is not None
    return data, node


def _parse(path: Path, what: str, *, compose: bool = False) -> tuple[dict[str, Any], yaml.Node | None]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(str(path), f"cannot read {what} ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise InputError(f"{path}:{line}", f"not UTF-8 text (byte {exc.start} of the {what})") from None
    try:
        node = yaml.compose(text) if compose else None
        data = yaml.load(text, Loader=_SAFE_LOADER)
    except RecursionError:  # PyYAML composes nested collections recursively
        raise InputError(str(path), f"malformed YAML (nested deeper than Python's recursion limit of "
                         f"{sys.getrecursionlimit()})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise InputError(where, f"malformed YAML ({getattr(exc, 'problem', None) or exc})") from None
    if not isinstance(data, dict):
        raise InputError(str(path), f"a {what} must be a mapping of keys to values, not {type(data).__name__}")
    return data, node


def loc_path(loc: tuple[Any, ...]) -> str:
    """Pydantic's error location as a key path: ``a.b[2].c``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def error_message(error: Any) -> str:
    """One pydantic error's message as a user reads it: "unknown key" for a key the schema lacks, and without
    pydantic's "Value error, " prefix for the schema's own checks."""
    if error["type"] == "extra_forbidden":
        return "unknown key"
    message = str(error["msg"]).removeprefix("Value error, ")
    value = error.get("input")
    if error["type"] == "int_parsing" and isinstance(value, str) and _is_float_text(value):
        message += f" (YAML reads {value} as text, not a number: write it out in digits, {float(value):.0f})"
    return message


def _is_float_text(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def validation_problem(exc: ValidationError) -> tuple[str, str]:
    """(key path, message) of a validation error's first problem, with how many more there are."""
    errors = exc.errors()
    first = errors[0]
    message = error_message(first)
    if len(errors) > 1:
        rest = "; ".join(f"{loc_path(tuple(e['loc']))}: {e['msg']}" for e in errors[1:])
        message += f" (and {len(errors) - 1} more: {rest})"
    return loc_path(tuple(first["loc"])), message
