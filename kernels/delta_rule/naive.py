"""Token-by-token (gated) delta rule: the oracle for every other path.

    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T      o_t = scale * q_t^T S_t

with S_t of shape (K, V) per head.  Computed in fp32; ``o`` is returned in ``v``'s dtype.
"""
from __future__ import annotations

import torch

from linear_moe.kernels.delta_rule.packing import split_packed


def naive_delta_rule(
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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q, k: (B, T, H, K); v: (B, T, H, V); beta, g: (B, T, H); initial_state: (N, H, K, V).

    Returns o (B, T, H, V) and the final state (N, H, K, V) fp32 (or None).  With ``cu_seqlens``
    (B == 1) each packed sequence runs on its own, from its own row of ``initial_state``.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if g is None:
        g = beta.new_zeros(beta.shape)
    if cu_seqlens is None:
        o, final = _recurrence(q, k, v, beta, g, scale, initial_state)
        return o, (final if output_final_state else None)
    outputs, finals = [], []
    for n, (start, end) in enumerate(split_packed(cu_seqlens)):
        s0 = None if initial_state is None else initial_state[n : n + 1]
        part = (x[:, start:end] for x in (q, k, v, beta, g))
        o_n, final_n = _recurrence(*part, scale, s0)
        outputs.append(o_n)
        finals.append(final_n)
    return torch.cat(outputs, dim=1), (torch.cat(finals) if output_final_state else None)


def _recurrence(q, k, v, beta, g, scale, initial_state):
    B, T, H, K = q.shape
    V = v.shape[-1]
    q, k, v, beta, g = (x.float() for x in (q, k, v, beta, g))
    S_BHKV = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.float()
    outputs = []
    for t in range(T):
        k_BHK = k[:, t]
        S_BHKV = S_BHKV * g[:, t].exp()[..., None, None]
        # delta rule: replace the value stored under k_t by v_t, at rate beta_t
        v_old_BHV = torch.einsum("bhk,bhkv->bhv", k_BHK, S_BHKV)
        delta_BHV = beta[:, t, :, None] * (v[:, t] - v_old_BHV)
        S_BHKV = S_BHKV + k_BHK[..., None] * delta_BHV[..., None, :]
        outputs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], S_BHKV))
    o = torch.stack(outputs, dim=1) if T else v.new_zeros(B, 0, H, V)
    return o.to(v.dtype), S_BHKV
