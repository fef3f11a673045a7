"""Content hashes of the tokenize output (its manifest)."""
from __future__ import annotations

import hashlib
from pathlib import Path


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
