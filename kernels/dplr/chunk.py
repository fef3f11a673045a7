"""Chunked DPLR delta rule in PyTorch: matmul-based, linear in T, stable for any decay.

Step: S_t = D_t S_{t-1} + b_t u_t^T + k_t v_t^T with u_t = S_{t-1}^T a_t, D_t = diag(exp(gk_t)).
In a chunk with cumulative log-decays gamma_t = sum_{s<=t} gk_s (vectors over K) and state S_0:

    u_t = (exp(gamma_{t-1}) a_t)^T S_0 + sum_{j<t} [A_ak]_tj v_j + [A_ab]_tj u_j
    [A_xy]_tj = sum_d x_t[d] y_j[d] exp(gamma_{t-1}[d] - gamma_j[d])

a unit lower-triangular system: (I - A_ab) U = A_ak V + (exp(gamma_{t-1}) a) S_0, solved once per
chunk for U~ and W with U = U~ + W S_0.  Outputs and the chunk's final state follow from U.

The pair decays exp(gamma_t - gamma_j) differ per channel, so [A_xy] is not a plain matmul of
decayed factors without risking overflow.  :func:`decay_dot` splits the chunk into sub-chunks:
blocks below the diagonal factor through the log-decay at the end of the column sub-chunk
(both factors have exponent <= 0 when gk <= 0), diagonal blocks use exact pairwise decays.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from linear_moe.kernels.delta_rule.packing import pack_index, packed_to_padded, padded_to_packed

SUB_CHUNK = 16


def chunk_dplr(
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
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same contract as :func:`linear_moe.kernels.dplr.dplr` (no input checks here)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    inputs = (q, k, v, a, b, gk)
    if cu_seqlens is not None:
        index_NL, valid_NL = pack_index(cu_seqlens)
        padded = [packed_to_padded(x, index_NL, valid_NL) for x in inputs]
        o_NL, final = _chunk_forward(*padded, scale, initial_state, chunk_size)
        return padded_to_packed(o_NL, valid_NL), (final if output_final_state else None)
    o, final = _chunk_forward(*inputs, scale, initial_state, chunk_size)
    return o, (final if output_final_state else None)


def decay_dot(x: torch.Tensor, log_x: torch.Tensor, y: torch.Tensor, log_y: torch.Tensor,
              strict: bool, sub: int) -> torch.Tensor:
    """M_tj = sum_d x_t[d] y_j[d] exp(log_x_t[d] - log_y_j[d]) for j < t (strict) or j <= t.

    x, log_x, y, log_y: (..., C, K) with C % sub == 0; log_y is the inclusive cumulative
    log-decay and log_x_t <= log_y_j whenever j is in an earlier sub-chunk than t.  Returns (..., C, C).
    """
    *lead, C, K = x.shape
    ns = C // sub
    block_C = torch.arange(C, device=x.device) // sub
    later_JC = block_C[None, :] > torch.arange(ns, device=x.device)[:, None]  # row t after sub-chunk J
    # below-diagonal blocks: factor through anchor_J = log-decay at the end of sub-chunk J
    anchor = log_y[..., sub - 1 :: sub, :]  # (..., ns, K)
    exp_x = torch.where(later_JC[..., None], log_x.unsqueeze(-3) - anchor.unsqueeze(-2), float("-inf")).exp()
    x_J = x.unsqueeze(-3) * exp_x  # (..., ns, C, K)
    y_blocks = y.reshape(*lead, ns, sub, K)
    y_J = y_blocks * (anchor.unsqueeze(-2) - log_y.reshape(*lead, ns, sub, K)).exp()  # (..., ns, sub, K)
    below = torch.einsum("...jtk,...jsk->...tjs", x_J, y_J).reshape(*lead, C, C)
    # diagonal blocks: exact pairwise decays, masked before exp
    mask_SS = torch.ones(sub, sub, dtype=torch.bool, device=x.device).tril(-1 if strict else 0)
    diff = log_x.reshape(*lead, ns, sub, 1, K) - log_y.reshape(*lead, ns, 1, sub, K)
    decay = torch.where(mask_SS[..., None], diff, float("-inf")).exp()  # (..., ns, sub, sub, K)
    diag = torch.einsum("...ntk,...nsk,...ntsk->...nts", x.reshape(*lead, ns, sub, K), y_blocks, decay)
    eye = torch.eye(ns, dtype=x.dtype, device=x.device)
    return below + torch.einsum("...nts,nm->...ntms", diag, eye).reshape(*lead, C, C)


def _to_chunks(x: torch.Tensor, C: int) -> torch.Tensor:
    """(B, T, H, D) zero-padded to a multiple of C -> (B, H, T/C, C, D) fp32."""
    B, T, H, D = x.shape
    pad = (-T) % C
    x = F.pad(x.float().movedim(2, 1), (0, 0, 0, pad))
    return x.reshape(B, H, (T + pad) // C, C, D)


def _chunk_forward(q, k, v, a, b, gk, scale, initial_state, C):
    B, T, H, K = q.shape
    V = v.shape[-1]
    sub = SUB_CHUNK if C % SUB_CHUNK == 0 else C
    q, k, v, a, b, gk = (_to_chunks(x, C) for x in (q, k, v, a, b, gk))  # (B, H, N, C, .)
    num_chunks = q.shape[2]
    gamma = gk.cumsum(-2)  # inclusive, (B, H, N, C, K)
    gamma_prev = gamma - gk  # exclusive: decay up to t - 1

    A_ab = decay_dot(a, gamma_prev, b, gamma, strict=True, sub=sub)
    A_ak = decay_dot(a, gamma_prev, k, gamma, strict=True, sub=sub)
    A_qk = decay_dot(q, gamma, k, gamma, strict=False, sub=sub)
    A_qb = decay_dot(q, gamma, b, gamma, strict=False, sub=sub)
    eye = torch.eye(C, device=q.device)
    rhs = torch.cat([A_ak @ v, a * gamma_prev.exp()], dim=-1)
    sol = torch.linalg.solve_triangular(eye - A_ab, rhs, upper=False, unitriangular=True)
    u_tilde, w = sol[..., :V], sol[..., V:]  # u = u_tilde + w @ S_0

    o_local = A_qk @ v
    q_decay = q * gamma.exp()
    to_end = (gamma[..., -1:, :] - gamma).exp()  # decay from j to the chunk end, (B, H, N, C, K)
    k_end, b_end = k * to_end, b * to_end
    chunk_decay = gamma[..., -1, :].exp()  # (B, H, N, K)

    S_BHKV = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.float()
    outputs = []
    for n in range(num_chunks):
        u = u_tilde[:, :, n] + w[:, :, n] @ S_BHKV
        outputs.append(o_local[:, :, n] + q_decay[:, :, n] @ S_BHKV + A_qb[:, :, n] @ u)
        S_BHKV = (chunk_decay[:, :, n, :, None] * S_BHKV + k_end[:, :, n].transpose(-1, -2) @ v[:, :, n]
                  + b_end[:, :, n].transpose(-1, -2) @ u)
    if not outputs:  # T == 0 (e.g. a packed batch of empty sequences)
        return v.new_zeros(B, 0, H, V), S_BHKV
    o_BHTV = torch.stack(outputs, dim=2).reshape(B, H, num_chunks * C, V)[:, :, :T]
    return (scale * o_BHTV).movedim(1, 2).to(v.dtype), S_BHKV
