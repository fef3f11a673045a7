"""Diagonal/scalar-decay linear attention: one recurrence for linear attention, Based/Rebased,
retention, lightning attention, simple GLA / Mamba2, GLA / HGRN2 and RWKV6 (with ``u``).

    S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t        o_t = scale * q_t S_t

With the RWKV6 bonus ``u``: ``o_t = scale * q_t (S_{t-1} + diag(u) k_t^T v_t)`` (fla's convention).
"""
from __future__ import annotations

from typing import Callable

import torch

from linear_moe.kernels.backend import resolve_backend
from linear_moe.kernels.gla.checks import decay_kind
from linear_moe.kernels.gla.chunk import chunk_gla
from linear_moe.kernels.gla.fla_dispatch import fla_gla
from linear_moe.kernels.gla.naive import naive_gla

__all__ = ["gla", "chunk_gla", "naive_gla", "fla_gla", "decay_kind", "GLA_BACKENDS"]


def gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    *,
    u: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the recurrence on the backend chosen by :func:`~linear_moe.kernels.backend.resolve_backend`.

    Args:
        q, k: (B, T, H, K).  v: (B, T, H, V).
        g: log-decay (<= 0), (B, T, H, K) diagonal, (B, T, H) scalar per head (fixed decays are
            passed expanded), or None (no decay).
        u: (H, K) RWKV6 bonus for the current token, or None.
        scale: defaults to K ** -0.5.
        initial_state: (N, H, K, V); N = B, or len(cu_seqlens) - 1 for packed sequences.
        cu_seqlens: int64 offsets (N + 1,) of sequences packed along T (B must be 1).
    Returns:
        o (B, T, H, V) in v's dtype, and the final state (N, H, K, V) fp32 if requested, else None.
    """
    run = GLA_BACKENDS[resolve_backend(backend, q)]  # each backend checks the inputs itself
    return run(
        q, k, v, g, u=u, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
        cu_seqlens=cu_seqlens, chunk_size=chunk_size,
    )


def _naive(q, k, v, g=None, *, chunk_size: int, **kwargs):
    return naive_gla(q, k, v, g, **kwargs)


#: concrete backend name -> implementation with gla's keyword signature (``"auto"`` is resolved first)
GLA_BACKENDS: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor | None]]] = {
    "naive": _naive,
    "chunk": chunk_gla,
    "fla": fla_gla,
}
