"""Backend choice for the LASP-2 state kernels: ``torch`` (reference math) or ``triton``."""
from __future__ import annotations

import torch

from linear_moe.kernels.triton_cpu import interpreter_enabled

LASP_BACKENDS = ("auto", "torch", "triton")


def resolve_lasp_backend(backend: str, reference: torch.Tensor) -> str:
    """``auto`` -> ``triton`` for CUDA tensors or under ``TRITON_INTERPRET=1``, else ``torch``."""
    if backend not in LASP_BACKENDS:
        raise ValueError(f"LASP backend must be one of {LASP_BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if reference.is_cuda or interpreter_enabled() else "torch"
    if backend == "triton" and not (reference.is_cuda or interpreter_enabled()):
        raise ValueError("LASP backend 'triton' needs CUDA tensors or TRITON_INTERPRET=1 "
                         "(call linear_moe.kernels.triton_cpu.enable_triton_interpreter() first); use 'torch'")
    return backend


def block(n: int) -> int:
    """Power-of-two block covering ``n`` (at least 16, the smallest ``tl.dot`` operand)."""
    return max(16, 1 << (n - 1).bit_length())
