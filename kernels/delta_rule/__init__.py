"""DeltaNet and Gated DeltaNet cores: ``delta_rule`` dispatches to naive / chunk / fla.

    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T      o_t = scale * q_t^T S_t
"""
from __future__ import annotations

from typing import Callable

import torch

from linear_moe.kernels.backend import resolve_backend
from linear_moe.kernels.delta_rule.chunk import chunk_delta_rule
from linear_moe.kernels.delta_rule.fla_dispatch import fla_delta_rule
from linear_moe.kernels.delta_rule.naive import naive_delta_rule
from linear_moe.kernels.delta_rule.packing import check_cu_seqlens

__all__ = ["delta_rule", "naive_delta_rule", "chunk_delta_rule", "fla_delta_rule"]


def delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    backend: str = "auto",
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(Gated) delta rule over (B, T, H, .) inputs.

    q, k: (B, T, H, K) (callers L2-normalise k); v: (B, T, H, V); beta: (B, T, H) in [0, 1];
    g: (B, T, H) log-decay (<= 0) or None for plain DeltaNet; scale defaults to K ** -0.5;
    initial_state: (N, H, K, V), N = B or len(cu_seqlens) - 1 for packed input (B == 1).
    Returns o (B, T, H, V) in v's dtype and the final state (N, H, K, V) fp32 (None unless asked).
    """
    _check_inputs(q, k, v, beta, g, initial_state, cu_seqlens, chunk_size)
    path = resolve_backend(backend, q)
    if path == "naive":
        return naive_delta_rule(q, k, v, beta, g, scale=scale, initial_state=initial_state,
                                output_final_state=output_final_state, cu_seqlens=cu_seqlens)
    return _CHUNKED[path](q, k, v, beta, g, scale=scale, initial_state=initial_state,
                          output_final_state=output_final_state, cu_seqlens=cu_seqlens, chunk_size=chunk_size)


_CHUNKED: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor | None]]] = {
    "chunk": chunk_delta_rule,
    "fla": fla_delta_rule,
}


def _check_inputs(q, k, v, beta, g, initial_state, cu_seqlens, chunk_size) -> None:
    if q.ndim != 4:
        raise ValueError(f"delta_rule: q must be (B, T, H, K), got shape {tuple(q.shape)}")
    B, T, H, K = q.shape
    if k.shape != q.shape:
        raise ValueError(f"delta_rule: k must match q's shape (B, T, H, K)={tuple(q.shape)}, got {tuple(k.shape)}")
    if v.ndim != 4 or v.shape[:3] != (B, T, H):
        raise ValueError(f"delta_rule: v must be (B, T, H, V) with (B, T, H)={(B, T, H)}, got {tuple(v.shape)}")
    for name, x in (("beta", beta), ("g", g)):
        if x is not None and x.shape != (B, T, H):
            raise ValueError(f"delta_rule: {name} must be (B, T, H)={(B, T, H)}, got {tuple(x.shape)}")
    if chunk_size <= 0:
        raise ValueError(f"delta_rule: chunk_size must be positive, got {chunk_size}")
    N = B if cu_seqlens is None else check_cu_seqlens(cu_seqlens, B, T)
    expected = (N, H, K, v.shape[-1])
    if initial_state is not None and tuple(initial_state.shape) != expected:
        raise ValueError(f"delta_rule: initial_state must be (N, H, K, V)={expected}, got {tuple(initial_state.shape)}")
