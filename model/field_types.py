"""Check config values against their type annotations, for errors that name the field.

Configs arrive from JSON, YAML and CLI strings, so ``seq_length: "32"`` or ``resume: "no"`` would
otherwise reach the code as the wrong type: a ``TypeError`` far from its cause, or a string that is
silently truthy. :func:`check_dataclass_types` checks every init field of a config dataclass;
:func:`matches` and :func:`describe` serve other annotated callables (a stage's entry function).
"""
from __future__ import annotations

import collections.abc
import dataclasses
import numbers
import types
import typing
from pathlib import Path
from typing import Any


def matches(value: Any, hint: Any) -> bool:
    """Whether ``value`` fits ``hint``: bool, int, float (ints too), str/Path (strings), None, unions,
    lists/tuples of those; other generics (dicts, ...) are left to the code that uses them."""
    if hint is Any:
        return True
    if hint is None or hint is type(None):
        return value is None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(matches(value, arg) for arg in typing.get_args(hint))
    if origin in (list, tuple, collections.abc.Sequence, collections.abc.Iterable):
        args = typing.get_args(hint)
        return isinstance(value, (list, tuple)) and (not args or all(matches(v, args[0]) for v in value))
    if origin is not None:
        return True
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if hint is str or (isinstance(hint, type) and issubclass(hint, Path)):
        return isinstance(value, str) or (hint is not str and isinstance(value, Path))
    return True


def describe(hint: Any) -> str:
    """``hint`` in words, for an error message ("an integer", "a number or null", ...)."""
    if hint is None or hint is type(None):
        return "null"
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        return " or ".join(dict.fromkeys(describe(arg) for arg in args if not (arg is int and float in args)))
    if origin is not None:
        args = typing.get_args(hint)
        return f"a list of {describe(args[0]).split(' ', 1)[-1]}s" if args else "a list"
    if isinstance(hint, type) and issubclass(hint, Path):
        return "a string (a path)"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(
        hint, getattr(hint, "__name__", str(hint)))


def type_error(where: str, value: Any, hint: Any) -> str:
    """The message for ``value`` at ``where`` (e.g. ``TrainConfig.seq_length``) not fitting ``hint``."""
    return f"{where} is {value!r} ({type(value).__name__}), expected {describe(hint)}"


def check_dataclass_types(instance: Any) -> None:
    """Raise ``ValueError`` naming the first init field of a dataclass whose value misfits its annotation."""
    hints = typing.get_type_hints(type(instance))
    for f in dataclasses.fields(instance):
        if f.init and not matches(getattr(instance, f.name), hints[f.name]):
            raise ValueError(type_error(f"{type(instance).__name__}.{f.name}", getattr(instance, f.name),
                                        hints[f.name]))
