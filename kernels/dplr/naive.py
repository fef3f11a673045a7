"""Token-by-token diagonal-plus-low-rank (DPLR) delta rule: the oracle.

Convention of fla's ``dplr_recurrence`` (state S: (K, V) per head):

    S_t = (diag(exp(gk_t)) + b_t a_t^T) S_{t-1} + k_t v_t^T          o_t = scale * q_t^T S_t

RWKV7 calls it with a = -kk, b = kk * a_rate (kk the L2-normalised key), gk = log-decay w.
"""
from __future__ import annotations

import torch

from linear_moe.kernels.delta_rule.packing import split_packed


def naive_dplr(
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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q, k, a, b, gk: (B, T, H, K); v: (B, T, H, V); initial_state: (N, H, K, V).

    Returns o (B, T, H, V) in v's dtype and the final state (N, H, K, V) fp32 (or None).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if cu_seqlens is None:
        o, final = _recurrence(q, k, v, a, b, gk, scale, initial_state)
        return o, (final if output_final_state else None)
    outputs, finals = [], []
    for n, (start, end) in enumerate(split_packed(cu_seqlens)):
        s0 = None if initial_state is None else initial_state[n : n + 1]
        o_n, final_n = _recurrence(*(x[:, start:end] for x in (q, k, v, a, b, gk)), scale, s0)
        outputs.append(o_n)
        finals.append(final_n)
    return torch.cat(outputs, dim=1), (torch.cat(finals) if output_final_state else None)


def _recurrence(q, k, v, a, b, gk, scale, initial_state):
    B, T, H, K = q.shape
    V = v.shape[-1]
    q, k, v, a, b, gk = (x.float() for x in (q, k, v, a, b, gk))
    S_BHKV = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.float()
    outputs = []
    for t in range(T):
        aS_BHV = torch.einsum("bhk,bhkv->bhv", a[:, t], S_BHKV)  # a_t^T S_{t-1}, before the decay
        S_BHKV = (gk[:, t].exp()[..., None] * S_BHKV + b[:, t, ..., None] * aS_BHV[..., None, :]
                  + k[:, t, ..., None] * v[:, t, :, None, :])
        outputs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], S_BHKV))
    o = torch.stack(outputs, dim=1) if T else v.new_zeros(B, 0, H, V)
    return o.to(v.dtype), S_BHKV
