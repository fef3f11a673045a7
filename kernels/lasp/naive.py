"""PyTorch references for LASP-2's state algebra (the oracles of the Triton kernels).

A chunk maps its incoming state to its outgoing one affinely, ``S_out = a(S_in) + b``, with
``b`` (N, H, K, V) and the transition ``a`` in one of two forms:

* diagonal: (N, H, K) - ``a(S) = a[..., None] * S`` (identity, fixed, scalar and diagonal decays);
* matrix:   (N, H, K, K) - ``a(S) = a @ S`` (delta rules).
"""
from __future__ import annotations

import torch


def apply_transition(a: torch.Tensor, s_NHKV: torch.Tensor) -> torch.Tensor:
    """``a(S)`` for a diagonal (N, H, K) or matrix (N, H, K, K) transition."""
    return a @ s_NHKV if a.ndim == s_NHKV.ndim else a.unsqueeze(-1) * s_NHKV


def apply_transition_adjoint(a: torch.Tensor, g_NHKV: torch.Tensor) -> torch.Tensor:
    """``a^T(G)``: the adjoint of :func:`apply_transition` (diagonal maps are self-adjoint)."""
    return a.transpose(-1, -2) @ g_NHKV if a.ndim == g_NHKV.ndim else a.unsqueeze(-1) * g_NHKV


def naive_prefix_compose(a_W: torch.Tensor, b_WNHKV: torch.Tensor, s0_NHKV: torch.Tensor) -> torch.Tensor:
    """States entering each of W chunks and leaving the last: (W + 1, N, H, K, V), fp32.

    ``states[0] = s0`` and ``states[r + 1] = a_r(states[r]) + b_r``.
    """
    states = [s0_NHKV.float()]
    for a, b in zip(a_W.float(), b_WNHKV.float()):
        states.append(apply_transition(a, states[-1]) + b)
    return torch.stack(states)


def naive_suffix_compose(
    a_W: torch.Tensor, states_W1NHKV: torch.Tensor, d_states_W1NHKV: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Adjoint of :func:`naive_prefix_compose`: ``(d_a_W, d_b_WNHKV, d_s0_NHKV)``.

    ``d_states[r]`` is the gradient reaching ``states[r]`` directly. The total gradient
    ``G_r = d_states[r] + a_r^T(G_{r+1})`` runs from ``G_W = d_states[W]`` down to ``G_0 = d_s0``;
    then ``d_b_r = G_{r+1}`` and ``d_a_r = G_{r+1} S_r^T`` (its diagonal for diagonal maps).
    """
    W = a_W.shape[0]
    a_W, states, d_states = a_W.float(), states_W1NHKV.float(), d_states_W1NHKV.float()
    grad = d_states[W]
    d_a, d_b = [None] * W, [None] * W
    for r in range(W - 1, -1, -1):
        d_b[r] = grad
        outer = grad @ states[r].transpose(-1, -2)
        d_a[r] = outer if a_W.ndim == states.ndim else outer.diagonal(dim1=-2, dim2=-1)
        grad = d_states[r] + apply_transition_adjoint(a_W[r], grad)
    return torch.stack(d_a), torch.stack(d_b), grad


def naive_state_correction(
    o_BTHV: torch.Tensor,
    q_BTHK: torch.Tensor,
    gcum_BTHK: torch.Tensor | None,
    s_BHKV: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """``o + scale * (q * exp(gcum)) @ S_in`` per (batch, head): the incoming state's output share.

    ``gcum`` is the inclusive cumulative log-decay since the chunk start (None: no decay).
    """
    qd = q_BTHK.float() if gcum_BTHK is None else q_BTHK.float() * gcum_BTHK.float().exp()
    return (o_BTHV.float() + scale * torch.einsum("bthk,bhkv->bthv", qd, s_BHKV.float())).to(o_BTHV.dtype)
