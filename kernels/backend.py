"""Backend selection shared by every op in ``kernels/``.

``backend`` is one of:

* ``"auto"``  - fla's Triton op when the inputs live on CUDA and fla imports, else ``"chunk"``;
* ``"chunk"`` - the PyTorch chunked form (matmul-based, linear in T): the CPU backend;
* ``"naive"`` - the token-by-token recurrence: the oracle;
* ``"fla"``   - fla's Triton op unconditionally (on CPU only under ``TRITON_INTERPRET=1``).
"""
from __future__ import annotations

import functools

import torch

BACKENDS = ("auto", "chunk", "naive", "fla")


@functools.cache
def fla_available() -> bool:
    try:
        import fla.ops  # noqa: F401
    except Exception:  # pragma: no cover - depends on the install
        return False
    return True


def resolve_backend(backend: str, reference: torch.Tensor) -> str:
    """Turn ``"auto"`` into a concrete backend for tensors like ``reference``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "fla" if reference.is_cuda and fla_available() else "chunk"
    return backend


@functools.cache
def fla_gated_backward_refused() -> bool:
    """Whether fla refuses the backward of its scalar-gated chunk ops on this machine.

    fla 0.6's ``chunk_bwd_dqkwg`` with a gate (the backward of ``chunk_simple_gla`` and
    ``chunk_gated_delta_rule``) is miscompiled by Triton >= 3.4, < 3.7.1 on Hopper GPUs (fla #640), so
    fla raises there unless its tilelang backend serves the kernel. The fla dispatchers then take ops
    with their own backward kernels: ``chunk_gla`` and ``chunk_kda`` with the gate broadcast over K.
    """
    import importlib.util

    try:
        from fla.utils import IS_NVIDIA_HOPPER, TRITON_ABOVE_3_4_0, TRITON_ABOVE_3_7_1
    except ImportError:  # pragma: no cover - depends on the install
        return False
    return bool(IS_NVIDIA_HOPPER and TRITON_ABOVE_3_4_0 and not TRITON_ABOVE_3_7_1
                and importlib.util.find_spec("tilelang") is None)
