"""Token-by-token oracle of the diagonal/scalar-decay linear-attention recurrence (fp32)."""
from __future__ import annotations

import torch

from linear_moe.kernels.gla.checks import check_gla_inputs


def naive_gla(
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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t``, ``o_t = scale q_t S_t``, one token at a time.

    With the RWKV6 bonus ``u`` (H, K): ``o_t = scale q_t (S_{t-1} + diag(u) k_t^T v_t)``.
    Shapes as :func:`linear_moe.kernels.gla.gla`; packed sequences are run one after another.
    """
    N = check_gla_inputs(q, k, v, g, u, initial_state, cu_seqlens)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if cu_seqlens is None:
        o_BTHV, state_NHKV = _recurrence(q, k, v, g, u, scale, initial_state)
    else:
        bounds = cu_seqlens.tolist()
        outs, states = [], []
        for n in range(N):
            part = slice(bounds[n], bounds[n + 1])
            g_n = None if g is None else g[:, part]
            s0 = None if initial_state is None else initial_state[n : n + 1]
            o_n, s_n = _recurrence(q[:, part], k[:, part], v[:, part], g_n, u, scale, s0)
            outs.append(o_n)
            states.append(s_n)
        o_BTHV, state_NHKV = torch.cat(outs, dim=1), torch.cat(states, dim=0)
    return o_BTHV.to(v.dtype), (state_NHKV if output_final_state else None)


def _recurrence(q, k, v, g, u, scale, initial_state):
    """Batched recurrence over B; returns o (B, T, H, V) fp32 and the state (B, H, K, V) fp32."""
    B, T, H, K = q.shape
    q, k, v = q.float() * scale, k.float(), v.float()
    state_BHKV = q.new_zeros(B, H, K, v.shape[-1])
    if initial_state is not None:
        state_BHKV = state_BHKV + initial_state.float()
    if g is not None:
        # scalar decay broadcasts over both K and V; diagonal decay over V only
        decay_BTHK1 = g.float().exp().reshape(B, T, H, g.shape[3] if g.dim() == 4 else 1, 1)
    outs = []
    for t in range(T):
        kv_BHKV = k[:, t, :, :, None] * v[:, t, :, None, :]
        if u is not None:
            read_BHKV = state_BHKV + u.float()[:, :, None] * kv_BHKV
            outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], read_BHKV))
        if g is not None:
            state_BHKV = state_BHKV * decay_BTHK1[:, t]
        state_BHKV = state_BHKV + kv_BHKV
        if u is None:
            outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], state_BHKV))
    o_BTHV = torch.stack(outs, dim=1) if outs else v.new_zeros(B, 0, H, v.shape[-1])
    return o_BTHV, state_BHKV
