"""``params.yaml``: one section per pipeline stage, keys = the stage entry function's arguments."""
from __future__ import annotations

import inspect
import typing
from pathlib import Path
from typing import Any, Callable, Iterable

from linear_moe.model.field_types import matches, type_error


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
        if key in hints and not matches(value, hints[key]):
            raise ValueError(f"--params {path}: {type_error(repr(f'{section}.{key}'), value, hints[key])}; "
                             f"fix its value in the '{section}:' section")
    return values


def _hints(function: Callable) -> dict[str, Any]:
    try:
        return typing.get_type_hints(function)
    except Exception:  # an annotation that does not evaluate: no type checks rather than no run
        return {}
