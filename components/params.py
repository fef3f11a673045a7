"""``params.yaml``: one section per pipeline stage, keys = the stage entry function's arguments."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable


def load_section(path: str | Path, section: str, known: Iterable[str]) -> dict[str, Any]:
    """The ``section:`` mapping of the YAML file ``path``; unknown keys are an error naming them."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as err:
        raise ValueError(f"--params {path}: cannot read ({err})") from None
    values = data.get(section) if isinstance(data, dict) else None
    if not isinstance(values, dict):
        raise ValueError(f"--params {path}: no '{section}:' mapping")
    known = set(known)
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"--params {path}: unknown key(s) {unknown} in '{section}:'; known: {sorted(known)}")
    return values
