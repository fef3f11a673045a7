"""Atomic writes for every component and benchmark: files and whole output directories are built
under a temporary sibling name, then renamed into place, so a reader (or a run killed halfway) never
sees half an output, and a failed run leaves the previous output as it was."""
from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; outputs are ordinary files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, data: object, default=None) -> None:
    """Sorted keys, 2-space indent, trailing newline; ``default`` handles non-JSON values."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False, default=default) + "\n")


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
    """Yield a fresh temporary directory next to ``final``; on success it replaces ``final``, on error
    it is deleted. A reader never sees a half-written ``final``. A previous ``final`` is swapped out
    in one step (:func:`exchange_paths`), so ``final`` never goes missing either; where the kernel or
    filesystem cannot exchange, two renames through a ``.<name>.old-*`` backup do it.
    ``final`` must pass :func:`check_replaceable` (``marker``: the file a previous output holds)."""
    final = Path(final)
    check_replaceable(final, marker, name)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it 0700; the output is an ordinary directory
    try:
        yield tmp
        if not final.exists():
            os.replace(tmp, final)
        elif not exchange_paths(tmp, final):  # where exchanged, tmp now holds the old output
            backup = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.replace(final, backup / final.name)  # a kill here leaves the old output in the backup
            os.replace(tmp, final)
            shutil.rmtree(backup)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


#: renameat2(2) flag: swap the two paths atomically (Linux 3.15+, glibc 2.28+; most local filesystems)
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
#: what renameat2 answers where the kernel, filesystem or sandbox cannot exchange
_EXCHANGE_UNSUPPORTED = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM)


def exchange_paths(a: str | Path, b: str | Path) -> bool:
    """Swap ``a`` and ``b`` (both must exist) in one atomic step; False, having changed nothing,
    where this system cannot (not Linux, no ``renameat2``, or a filesystem without exchange)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in _EXCHANGE_UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))
