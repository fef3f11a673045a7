"""What every benchmark script shares: writing its JSON so that a reader never sees half a file, and
timing a CUDA call."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` to a temporary file beside ``path``, then rename it over ``path``.

    The scripts call it after every measured case too (with ``"complete": False``), so a run cut
    short by a timeout still leaves every figure it had measured.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cuda_seconds(fn: Callable[[], Any], rep_ms: int = 100) -> float:
    """Median seconds per call of ``fn`` on CUDA: ``triton.testing.do_bench`` over about ``rep_ms`` of
    calls after a warm-up, with the L2 cache flushed between calls, so that a small kernel's launch
    latency and a cache kept hot between calls do not stand in for its cost."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=max(rep_ms // 4, 1), rep=rep_ms, return_mode="median") / 1e3
