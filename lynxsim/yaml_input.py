"""Reading a user's YAML file and reporting what is wrong in it, the same way for every kind of file.

Experiments, hardware profiles, model files, routing profiles and kernel tables are all YAML mappings validated
by pydantic; a problem in any of them must reach the user as one line naming the file, the line where YAML can
tell it, and the key path, never as a traceback.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from lynxsim.errors import InputError

ModelT = TypeVar("ModelT", bound=BaseModel)

_BASE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
"""libyaml's safe loader where PyYAML was built with it: the same data and error marks, about ten times faster
than the pure-Python one on the hardware profile's kernel tables (read at the start of every run)."""


class _UniqueKeyLoader(_BASE_LOADER):  # type: ignore[misc,valid-type]
    """The safe loader, refusing a key written twice in one mapping: YAML lets the last one win silently, so a
    file that sets ``alpha`` twice would run with a value the user may not have meant."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)  # constructed once: the base class reads it back
            if not isinstance(key, (str, int, float, bool)):
                continue
            if key in seen:
                first = seen[key].start_mark.line + 1
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first written on line {first})", key_node.start_mark)
            seen[key] = key_node
        return dict(super().construct_mapping(node, deep=deep))


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
        data = yaml.load(text, Loader=_UniqueKeyLoader)
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


def value_problem(raw: Any, validated: Any, loc: tuple[Any, ...] = ()) -> tuple[tuple[Any, ...], str] | None:
    """The first value of validated data (``validated``: its ``model_dump``) that no user file may give, with its
    location and why: a NaN or an infinity (no key of an experiment, profile, model or table takes one: an unbounded
    limit is written by leaving the key out or as null; pydantic reads ".inf", "inf" and "nan" as floats), a
    number given as true/false (pydantic reads a boolean as 1 or 0), or text that is not valid Unicode (YAML's
    "\ud800" escapes give lone surrogates, which no file or terminal can take). Every key is checked, plug-in
    parameters and sweep values included, by walking the validated values beside what the user wrote (``raw``)."""
    if isinstance(validated, str) and not validated.isascii():
        try:
            validated.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates ("\ud800" in YAML): no file or terminal can hold them
            return loc, f"{validated.encode('utf-8', 'backslashreplace').decode()!r} is not valid Unicode text"
    if isinstance(validated, float) and not math.isfinite(validated):
        return loc, f"{validated} is not a finite number (leave the key out, or null, for no limit)"
    if isinstance(raw, bool) and isinstance(validated, (int, float)) and not isinstance(validated, bool):
        return loc, f"a number is needed, not {str(raw).lower()}"
    if isinstance(validated, dict):
        for key, value in validated.items():
            found = value_problem(raw.get(key) if isinstance(raw, dict) else None, value, (*loc, key))
            if found is not None:
                return found
    elif isinstance(validated, (list, tuple)):
        for index, value in enumerate(validated):
            inner = raw[index] if isinstance(raw, list) and index < len(raw) else None
            found = value_problem(inner, value, (*loc, index))
            if found is not None:
                return found
    return None


def validated(model: type[ModelT], data: Any, where: str) -> ModelT:
    """``model.model_validate(data)``, every problem (pydantic's, or a value ``value_problem`` refuses) an
    ``InputError`` at ``where`` (a file) and the key path: the one way a user's data file is validated."""
    try:
        value = model.model_validate(data)
    except ValidationError as exc:
        key_path, problem = validation_problem(exc)
        raise InputError(f"{where}: {key_path}", problem) from None
    found = value_problem(data, value.model_dump(mode="python"))
    if found is not None:
        raise InputError(f"{where}: {loc_path(found[0])}", found[1])
    return value


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
