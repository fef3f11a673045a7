"""Prefix composition of per-chunk affine state maps (LASP-2 forward) and its adjoint (backward).

Given W chunks' maps ``S -> a_r(S) + b_r`` and the state ``s0`` entering chunk 0, the prefix
composition returns every chunk's incoming state; the suffix composition pushes state gradients
back through the same chain. Shapes and the two transition forms are in ``naive.py``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from linear_moe.kernels.lasp.backend import block, resolve_lasp_backend
from linear_moe.kernels.lasp.naive import naive_prefix_compose, naive_suffix_compose


def prefix_compose(a_W: torch.Tensor, b_WNHKV: torch.Tensor, s0_NHKV: torch.Tensor, *,
                   backend: str = "auto") -> torch.Tensor:
    """Differentiable ``states`` (W + 1, N, H, K, V) fp32: ``states[r + 1] = a_r(states[r]) + b_r``.

    a_W: (W, N, H, K) diagonal or (W, N, H, K, K) matrix transitions; b: (W, N, H, K, V);
    s0: (N, H, K, V). The backward pass is the explicit suffix composition.
    """
    _check(a_W, b_WNHKV, s0_NHKV)
    return PrefixCompose.apply(a_W, b_WNHKV, s0_NHKV, resolve_lasp_backend(backend, b_WNHKV))


def prefix_compose_states(a_W, b_WNHKV, s0_NHKV, backend: str) -> torch.Tensor:
    """Forward only (no autograd): the registry entry for ``backend`` (``torch`` or ``triton``)."""
    return _PREFIX[backend](a_W, b_WNHKV, s0_NHKV)


def suffix_compose(a_W, states_W1NHKV, d_states_W1NHKV, backend: str):
    """Adjoint of the prefix composition: ``(d_a_W, d_b_WNHKV, d_s0_NHKV)`` fp32."""
    return _SUFFIX[backend](a_W, states_W1NHKV, d_states_W1NHKV)


class PrefixCompose(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a_W, b_WNHKV, s0_NHKV, backend):
        states = prefix_compose_states(a_W, b_WNHKV, s0_NHKV, backend)
        ctx.save_for_backward(a_W, states)
        ctx.backend = backend
        ctx.dtypes = (a_W.dtype, b_WNHKV.dtype, s0_NHKV.dtype)
        return states

    @staticmethod
    def backward(ctx, d_states):
        a_W, states = ctx.saved_tensors
        d_a, d_b, d_s0 = suffix_compose(a_W, states, d_states, ctx.backend)
        return d_a.to(ctx.dtypes[0]), d_b.to(ctx.dtypes[1]), d_s0.to(ctx.dtypes[2]), None


def _check(a_W: torch.Tensor, b_WNHKV: torch.Tensor, s0_NHKV: torch.Tensor) -> None:
    if b_WNHKV.ndim != 5:
        raise ValueError(f"prefix_compose: b must be (W, N, H, K, V), got shape {tuple(b_WNHKV.shape)}")
    W, N, H, K, V = b_WNHKV.shape
    if tuple(a_W.shape) not in ((W, N, H, K), (W, N, H, K, K)):
        raise ValueError(f"prefix_compose: a must be (W, N, H, K)={(W, N, H, K)} (diagonal) or "
                         f"(W, N, H, K, K) (matrix), got {tuple(a_W.shape)}")
    if tuple(s0_NHKV.shape) != (N, H, K, V):
        raise ValueError(f"prefix_compose: s0 must be (N, H, K, V)={(N, H, K, V)}, got {tuple(s0_NHKV.shape)}")


# ------------------------------------------------------------------------------------ Triton
def _triton_prefix(a_W, b_WNHKV, s0_NHKV):
    W, N, H, K, V = b_WNHKV.shape
    states = b_WNHKV.new_empty((W + 1, N, H, K, V), dtype=torch.float32)
    _prefix_compose_fwd_kernel[(N * H,)](
        a_W.contiguous(), b_WNHKV.contiguous(), s0_NHKV.contiguous(), states, W, N * H,
        K=K, V=V, BK=block(K), BV=block(V), MATRIX=a_W.ndim == 5,
    )
    return states


def _triton_suffix(a_W, states_W1NHKV, d_states_W1NHKV):
    W1, N, H, K, V = states_W1NHKV.shape
    d_a = torch.empty(a_W.shape, device=a_W.device, dtype=torch.float32)
    d_b = states_W1NHKV.new_empty((W1 - 1, N, H, K, V))
    d_s0 = states_W1NHKV.new_empty((N, H, K, V))
    _suffix_compose_bwd_kernel[(N * H,)](
        a_W.contiguous(), states_W1NHKV.contiguous(), d_states_W1NHKV.contiguous(), d_a, d_b, d_s0,
        W1 - 1, N * H, K=K, V=V, BK=block(K), BV=block(V), MATRIX=a_W.ndim == 5,
    )
    return d_a, d_b, d_s0


@triton.jit
def _load_transition(a, r, i_nh, NH, K: tl.constexpr, BK: tl.constexpr, MATRIX: tl.constexpr):
    rk = tl.arange(0, BK)
    if MATRIX:
        ptr = a + (r * NH + i_nh) * K * K + rk[:, None] * K + rk[None, :]
        return tl.load(ptr, mask=(rk[:, None] < K) & (rk[None, :] < K), other=0.0).to(tl.float32)
    else:
        return tl.load(a + (r * NH + i_nh) * K + rk, mask=rk < K, other=0.0).to(tl.float32)


@triton.jit
def _prefix_compose_fwd_kernel(a, b, s0, states, W, NH, K: tl.constexpr, V: tl.constexpr,
                               BK: tl.constexpr, BV: tl.constexpr, MATRIX: tl.constexpr):
    """One program per (n, h): walk the W chunks in order, storing each incoming state."""
    i_nh = tl.program_id(0).to(tl.int64)  # int64 offsets: (W+1)*N*H*K*V may pass 2^31
    rk, rv = tl.arange(0, BK), tl.arange(0, BV)
    kv = rk[:, None] * V + rv[None, :]
    m_kv = (rk[:, None] < K) & (rv[None, :] < V)
    s = tl.load(s0 + i_nh * K * V + kv, mask=m_kv, other=0.0).to(tl.float32)
    tl.store(states + i_nh * K * V + kv, s, mask=m_kv)
    for r in range(0, W):
        a_r = _load_transition(a, r, i_nh, NH, K, BK, MATRIX)
        b_r = tl.load(b + (r * NH + i_nh) * K * V + kv, mask=m_kv, other=0.0).to(tl.float32)
        if MATRIX:
            s = tl.dot(a_r, s, input_precision="ieee") + b_r
        else:
            s = a_r[:, None] * s + b_r
        tl.store(states + ((r + 1) * NH + i_nh) * K * V + kv, s, mask=m_kv)


@triton.jit
def _suffix_compose_bwd_kernel(a, states, d_states, d_a, d_b, d_s0, W, NH, K: tl.constexpr, V: tl.constexpr,
                               BK: tl.constexpr, BV: tl.constexpr, MATRIX: tl.constexpr):
    """One program per (n, h): walk the chunks backwards, G_r = dS_r + a_r^T G_{r+1}."""
    i_nh = tl.program_id(0).to(tl.int64)  # int64 offsets: (W+1)*N*H*K*V may pass 2^31
    rk, rv = tl.arange(0, BK), tl.arange(0, BV)
    kv = rk[:, None] * V + rv[None, :]
    m_kv = (rk[:, None] < K) & (rv[None, :] < V)
    grad = tl.load(d_states + (W * NH + i_nh) * K * V + kv, mask=m_kv, other=0.0).to(tl.float32)
    for i in range(0, W):
        r = W - 1 - i
        tl.store(d_b + (r * NH + i_nh) * K * V + kv, grad, mask=m_kv)
        s_r = tl.load(states + (r * NH + i_nh) * K * V + kv, mask=m_kv, other=0.0)
        a_r = _load_transition(a, r, i_nh, NH, K, BK, MATRIX)
        if MATRIX:
            d_a_r = tl.dot(grad, tl.trans(s_r), input_precision="ieee")
            kk = rk[:, None] * K + rk[None, :]
            tl.store(d_a + (r * NH + i_nh) * K * K + kk, d_a_r, mask=(rk[:, None] < K) & (rk[None, :] < K))
            grad_next = tl.dot(tl.trans(a_r), grad, input_precision="ieee")
        else:
            tl.store(d_a + (r * NH + i_nh) * K + rk, tl.sum(grad * s_r, axis=1), mask=rk < K)
            grad_next = a_r[:, None] * grad
        grad = grad_next + tl.load(d_states + (r * NH + i_nh) * K * V + kv, mask=m_kv, other=0.0).to(tl.float32)
    tl.store(d_s0 + i_nh * K * V + kv, grad, mask=m_kv)


_PREFIX = {"torch": naive_prefix_compose, "triton": _triton_prefix}
_SUFFIX = {"torch": naive_suffix_compose, "triton": _triton_suffix}
