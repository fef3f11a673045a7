"""Atomic output directories, content hashes and canonical JSON."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def check_replaceable(final: str | Path, marker: str | None = None, name: str = "output_dir") -> None:
    """Raise unless ``final`` may be replaced by a new output directory: it is absent, an empty
    directory or (with ``marker``) a directory holding ``marker``, i.e. a previous output of the
    same step. Anything else (a file, someone's non-empty directory) would be deleted by the swap."""
    final = Path(final)
    if not final.exists() and not final.is_symlink():
        return
    if not final.is_dir():
        raise ValueError(f"{name} {final} exists and is not a directory; it would be replaced: remove it or "
                         "choose another output directory")
    if marker is not None and any(final.iterdir()) and not (final / marker).exists():
        raise ValueError(f"{name} {final} is a non-empty directory without {marker}, so not a previous output of "
                         "this step; replacing it would delete its contents: choose a new or empty directory, "
                         "or remove it first")


@contextlib.contextmanager
def atomic_dir(final: Path, marker: str | None = None, name: str = "output_dir") -> Iterator[Path]:
    """Yield a fresh temporary directory next to ``final``; on success it replaces ``final``
    by a rename, on error it is deleted. A reader never sees a half-written ``final``.
    ``final`` must pass :func:`check_replaceable` (``marker``: the file a previous output holds)."""
    final = Path(final)
    check_replaceable(final, marker, name)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it 0700; the output is an ordinary directory
    try:
        yield tmp
        if final.exists():  # swap: old -> backup, new -> final, drop backup
            backup = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.replace(final, backup / final.name)
            os.replace(tmp, final)
            shutil.rmtree(backup)
        else:
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def sha256_file(path: Path, block: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def hash_tree(root: Path, exclude: tuple[str, ...] = ()) -> dict[str, str]:
    """``{relative posix path: sha256}`` of every file below ``root``, sorted by path."""
    files = sorted(p for p in Path(root).rglob("*") if p.is_file())
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in files
            if p.relative_to(root).as_posix() not in exclude}


def write_json(path: Path, data: object) -> None:
    """Canonical JSON (sorted keys, 2-space indent, trailing newline) so reruns are byte-identical."""
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
