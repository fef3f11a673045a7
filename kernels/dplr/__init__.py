"""Diagonal-plus-low-rank (generalised) delta rule, the RWKV7 core: naive / chunk / fla.

    S_t = (diag(exp(gk_t)) + b_t a_t^T) S_{t-1} + k_t v_t^T          o_t = scale * q_t^T S_t
"""
from __future__ import annotations

from typing import Callable

import torch

from linear_moe.kernels.backend import resolve_backend
from linear_moe.kernels.delta_rule.packing import check_cu_seqlens
from linear_moe.kernels.dplr.chunk import chunk_dplr
from linear_moe.kernels.dplr.fla_dispatch import fla_dplr
from linear_moe.kernels.dplr.naive import naive_dplr

__all__ = ["dplr", "naive_dplr", "chunk_dplr", "fla_dplr"]


def dplr(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    gk: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    backend: str = "auto",
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """DPLR delta rule over (B, T, H, .) inputs, in fla's convention.

    q, k, a, b: (B, T, H, K); gk: (B, T, H, K) log-decay (<= 0); v: (B, T, H, V); scale defaults
    to K ** -0.5; initial_state: (N, H, K, V), N = B or len(cu_seqlens) - 1 (packed, B == 1).
    Returns o (B, T, H, V) in v's dtype and the final state (N, H, K, V) fp32 (None unless asked).
    """
    _check_inputs(q, k, v, a, b, gk, initial_state, cu_seqlens, chunk_size)
    path = resolve_backend(backend, q)
    kwargs = dict(scale=scale, initial_state=initial_state, output_final_state=output_final_state,
                  cu_seqlens=cu_seqlens)
    if path == "naive":
        return naive_dplr(q, k, v, a, b, gk, **kwargs)
    return _CHUNKED[path](q, k, v, a, b, gk, chunk_size=chunk_size, **kwargs)


_CHUNKED: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor | None]]] = {
    "chunk": chunk_dplr,
    "fla": fla_dplr,
}


def _check_inputs(q, k, v, a, b, gk, initial_state, cu_seqlens, chunk_size) -> None:
    if q.ndim != 4:
        raise ValueError(f"dplr: q must be (B, T, H, K), got shape {tuple(q.shape)}")
    B, T, H, K = q.shape
    for name, x in (("k", k), ("a", a), ("b", b), ("gk", gk)):
        if x.shape != q.shape:
            raise ValueError(f"dplr: {name} must match q's shape (B, T, H, K)={tuple(q.shape)}, got {tuple(x.shape)}")
    if v.ndim != 4 or v.shape[:3] != (B, T, H):
        raise ValueError(f"dplr: v must be (B, T, H, V) with (B, T, H)={(B, T, H)}, got {tuple(v.shape)}")
    if chunk_size <= 0:
        raise ValueError(f"dplr: chunk_size must be positive, got {chunk_size}")
    N = B if cu_seqlens is None else check_cu_seqlens(cu_seqlens, B, T)
    expected = (N, H, K, v.shape[-1])
    if initial_state is not None and tuple(initial_state.shape) != expected:
        raise ValueError(f"dplr: initial_state must be (N, H, K, V)={expected}, got {tuple(initial_state.shape)}")
