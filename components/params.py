"""``params.yaml``: one section per pipeline stage, keys = the stage entry function's arguments."""
from __future__ import annotations

import collections.abc
import inspect
import types
import typing
from pathlib import Path
from typing import Any, Callable, Iterable


def load_section(path: str | Path, section: str, known: Iterable[str] | Callable) -> dict[str, Any]:
    """The ``section:`` mapping of the YAML file ``path``; unknown keys are an error naming them.

    ``known`` is the accepted key names, or the stage's entry function: then its parameters are the
    keys and every value is also checked against the parameter's annotation (``vocab_size: "300"``
    is an error naming the key, not a ``TypeError`` deep inside the step).
    """
    import yaml

    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise ValueError(f"--params {path}: cannot read ({err})") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"--params {path}: not UTF-8 text (invalid byte at offset {err.start}); "
                         "save it as UTF-8 YAML") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(f"--params {path}: invalid YAML{where} ({problem}); fix the syntax") from None
    values = data.get(section) if isinstance(data, dict) else None
    if not isinstance(values, dict):
        raise ValueError(f"--params {path}: no '{section}:' mapping")
    hints = _hints(known) if callable(known) else {}
    names = set(inspect.signature(known).parameters) if callable(known) else set(known)
    unknown = sorted(set(values) - names, key=str)
    if unknown:
        raise ValueError(f"--params {path}: unknown key(s) {unknown} in '{section}:'; known: {sorted(names)}")
    for key, value in values.items():
        if key in hints and not _matches(value, hints[key]):
            raise ValueError(f"--params {path}: '{section}.{key}' is {value!r} ({type(value).__name__}), "
                             f"expected {_describe(hints[key])}; fix its value in the '{section}:' section")
    return values


def _hints(function: Callable) -> dict[str, Any]:
    try:
        return typing.get_type_hints(function)
    except Exception:  # an annotation that does not evaluate: no type checks rather than no run
        return {}


def _matches(value: Any, hint: Any) -> bool:
    """Whether a YAML value fits ``hint`` (int, float, str, bool, Path, None, unions, sequences)."""
    if hint is Any:
        return True
    if hint is None or hint is type(None):
        return value is None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if origin in (list, tuple, collections.abc.Sequence, collections.abc.Iterable):
        args = typing.get_args(hint)
        return isinstance(value, (list, tuple)) and (not args or all(_matches(v, args[0]) for v in value))
    if origin is not None:
        return True  # dicts and other generics: left to the step
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint in (str, Path) or (isinstance(hint, type) and issubclass(hint, Path)):
        return isinstance(value, str)
    return True


def _describe(hint: Any) -> str:
    if hint is None or hint is type(None):
        return "null"
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(hint) if not (arg is int and float in typing.get_args(hint))]
        return " or ".join(dict.fromkeys(_describe(arg) for arg in args))
    if origin is not None:
        args = typing.get_args(hint)
        return f"a list of {_describe(args[0]).split(' ', 1)[-1]}s" if args else "a list"
    if hint is Path:
        return "a string"  # a path
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(hint, getattr(
        hint, "__name__", str(hint)))
