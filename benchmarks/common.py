"""What the benchmark scripts share: timing a CUDA call. (Their JSON goes through
``linear_moe.components.files.atomic_write_json``, after every case, so a run cut short keeps what
it measured.)"""
from __future__ import annotations

from typing import Any, Callable


def cuda_seconds(fn: Callable[[], Any], rep_ms: int = 100) -> float:
    """Median seconds per call of ``fn`` on CUDA: ``triton.testing.do_bench`` over about ``rep_ms`` of
    calls after a warm-up, with the L2 cache flushed between calls, so that a small kernel's launch
    latency and a cache kept hot between calls do not stand in for its cost."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=max(rep_ms // 4, 1), rep=rep_ms, return_mode="median") / 1e3
