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
