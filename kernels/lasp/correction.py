"""The fused state correction of LASP-2 for decay families.

A chunk run from a zero state gives ``o_local``; the true incoming state ``S_in`` adds
``scale * (q_t * exp(gcum_t)) @ S_in`` to each token's output, ``gcum_t`` being the inclusive
cumulative log-decay since the chunk start. One kernel reads q, gcum, S_in and o_local once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from linear_moe.kernels.lasp.backend import block, resolve_lasp_backend
from linear_moe.kernels.lasp.naive import naive_state_correction


def state_correction(o_BTHV: torch.Tensor, q_BTHK: torch.Tensor, gcum_BTHK: torch.Tensor | None,
                     s_BHKV: torch.Tensor, scale: float, *, backend: str = "auto") -> torch.Tensor:
    """``o + scale * (q * exp(gcum)) @ S_in``, differentiable in o, q, gcum and S_in.

    o: (B, T, H, V); q: (B, T, H, K); gcum: (B, T, H, K), or None for no decay (scalar decays
    pass ``gcum[..., None].expand(-1, -1, -1, K)``); S_in: (B, H, K, V). Returns o's dtype.
    """
    B, T, H, K = q_BTHK.shape
    V = o_BTHV.shape[-1]
    if tuple(o_BTHV.shape) != (B, T, H, V) or tuple(s_BHKV.shape) != (B, H, K, V):
        raise ValueError(f"state_correction: expected o (B, T, H, V) and S_in (B, H, K, V) with (B, T, H, K)="
                         f"{(B, T, H, K)}, got o {tuple(o_BTHV.shape)} and S_in {tuple(s_BHKV.shape)}")
    if gcum_BTHK is not None and gcum_BTHK.shape != q_BTHK.shape:
        raise ValueError(f"state_correction: gcum must be (B, T, H, K)={(B, T, H, K)} like q, "
                         f"got {tuple(gcum_BTHK.shape)}")
    return StateCorrection.apply(o_BTHV, q_BTHK, gcum_BTHK, s_BHKV, float(scale),
                                 resolve_lasp_backend(backend, q_BTHK))


class StateCorrection(torch.autograd.Function):
    @staticmethod
    def forward(ctx, o, q, gcum, s, scale, backend):
        ctx.save_for_backward(q, gcum, s)
        ctx.scale, ctx.backend = scale, backend
        return _FORWARD[backend](o, q, gcum, s, scale)

    @staticmethod
    def backward(ctx, d_out):
        q, gcum, s = ctx.saved_tensors
        d_q, d_gcum, d_s = _BACKWARD[ctx.backend](d_out, q, gcum, s, ctx.scale)
        return (d_out, d_q.to(q.dtype), None if gcum is None else d_gcum.to(gcum.dtype), d_s.to(s.dtype),
                None, None)


def _torch_backward(d_out, q, gcum, s, scale):
    decay = torch.ones_like(q, dtype=torch.float32) if gcum is None else gcum.float().exp()
    qd = q.float() * decay
    d_qd = scale * torch.einsum("bthv,bhkv->bthk", d_out.float(), s.float())
    d_s = scale * torch.einsum("bthk,bthv->bhkv", qd, d_out.float())
    return d_qd * decay, d_qd * qd, d_s


# ------------------------------------------------------------------------------------ Triton
_BT = 16


def _triton_forward(o, q, gcum, s, scale):
    B, T, H, K = q.shape
    V = o.shape[-1]
    o = o.contiguous()  # the kernel addresses (B, T, H, V) row-major; chunked cores return strided views
    out = torch.empty_like(o)
    g = q if gcum is None else gcum.contiguous()  # unused pointer when HAS_G is False
    _correction_fwd_kernel[(triton.cdiv(T, _BT), B * H)](
        o, q.contiguous(), g, s.contiguous(), out, T, H, scale,
        K=K, V=V, BT=_BT, BK=block(K), BV=block(V), HAS_G=gcum is not None,
    )
    return out


#: backward tiles: T rows per step, and K rows of S per program (S's and dS's (BK, V) tiles stay in registers)
_BT_BWD, _BK_BWD = 64, 32


def _programs_wanted(device: torch.device) -> int:
    """About four programs per multiprocessor; 16 under the interpreter (so small test shapes split T too)."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 16


def _triton_backward(d_out, q, gcum, s, scale):
    """Grid (K blocks, T splits, B * H); the T splits' partial dS are summed here (deterministic).

    A first version ran one program per (b, h) looping over all of T with a (K, V) tile of S and of dS
    in registers: on an H200 (B=4, H=8, K=V=128) its forward+backward took 3x PyTorch autograd's.
    """
    B, T, H, K = q.shape
    V = d_out.shape[-1]
    BK = min(_BK_BWD, block(K))
    n_k, n_t = triton.cdiv(K, BK), triton.cdiv(T, _BT_BWD)
    splits = max(1, min(n_t, triton.cdiv(_programs_wanted(q.device), n_k * B * H)))
    t_split = triton.cdiv(n_t, splits) * _BT_BWD  # whole BT steps, so no step crosses two splits
    splits = triton.cdiv(T, t_split)
    d_q = torch.empty(q.shape, device=q.device, dtype=torch.float32)
    d_g = torch.empty_like(d_q)
    d_s_parts = torch.empty((splits, B * H, K, V), device=s.device, dtype=torch.float32)
    g = q if gcum is None else gcum.contiguous()
    _correction_bwd_kernel[(n_k, splits, B * H)](
        d_out.contiguous(), q.contiguous(), g, s.contiguous(), d_q, d_g, d_s_parts, T, H, scale, t_split,
        K=K, V=V, BT=_BT_BWD, BK=BK, BV=block(V), HAS_G=gcum is not None,
    )
    return d_q, d_g, d_s_parts.sum(0).view(B, H, K, V)


@triton.jit
def _correction_fwd_kernel(o, q, g, s, out, T, H, scale, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                           BK: tl.constexpr, BV: tl.constexpr, HAS_G: tl.constexpr):
    """Grid (T blocks, B * H): out = o + scale * (q * exp(g)) @ S for one (BT, V) tile."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)  # int64 offsets: B*T*H*K may pass 2^31
    i_b, i_h = i_bh // H, i_bh % H
    rt = i_t * BT + tl.arange(0, BT)
    rk, rv = tl.arange(0, BK), tl.arange(0, BV)
    tk = ((i_b * T + rt[:, None]) * H + i_h) * K + rk[None, :]
    tv = ((i_b * T + rt[:, None]) * H + i_h) * V + rv[None, :]
    m_tk = (rt[:, None] < T) & (rk[None, :] < K)
    m_tv = (rt[:, None] < T) & (rv[None, :] < V)
    qd = tl.load(q + tk, mask=m_tk, other=0.0).to(tl.float32)
    if HAS_G:
        qd = qd * tl.exp(tl.load(g + tk, mask=m_tk, other=0.0).to(tl.float32))
    m_kv = (rk[:, None] < K) & (rv[None, :] < V)
    s_kv = tl.load(s + i_bh * K * V + rk[:, None] * V + rv[None, :], mask=m_kv, other=0.0).to(tl.float32)
    acc = tl.load(o + tv, mask=m_tv, other=0.0).to(tl.float32)
    acc += scale * tl.dot(qd, s_kv, input_precision="ieee")
    tl.store(out + tv, acc.to(out.dtype.element_ty), mask=m_tv)


@triton.jit
def _correction_bwd_kernel(d_out, q, g, s, d_q, d_g, d_s_parts, T, H, scale, T_SPLIT, K: tl.constexpr,
                           V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_G: tl.constexpr):
    """Grid (K blocks, T splits, B * H). For its BK rows of S and its T range [i_s * T_SPLIT, + T_SPLIT):
    d_qd = scale * dO S^T per BT step (stored as dq = d_qd * exp(g), dg = d_qd * q * exp(g)), and the
    partial dS = scale * sum_t (q * exp(g))^T dO over the range, stored in d_s_parts[i_s, b * H + h]."""
    i_k, i_s, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    rk, rv = i_k * BK + tl.arange(0, BK), tl.arange(0, BV)
    m_kv = (rk[:, None] < K) & (rv[None, :] < V)
    s_kv = tl.load(s + i_bh * K * V + rk[:, None] * V + rv[None, :], mask=m_kv, other=0.0).to(tl.float32)
    d_s_kv = tl.zeros([BK, BV], dtype=tl.float32)
    t_start = i_s * T_SPLIT
    for t0 in range(t_start, tl.minimum(t_start + T_SPLIT, T), BT):
        rt = t0 + tl.arange(0, BT)
        tk = ((i_b * T + rt[:, None]) * H + i_h) * K + rk[None, :]
        tv = ((i_b * T + rt[:, None]) * H + i_h) * V + rv[None, :]
        m_tk = (rt[:, None] < T) & (rk[None, :] < K)
        m_tv = (rt[:, None] < T) & (rv[None, :] < V)
        do = tl.load(d_out + tv, mask=m_tv, other=0.0).to(tl.float32)
        b_q = tl.load(q + tk, mask=m_tk, other=0.0).to(tl.float32)
        decay = tl.full([BT, BK], 1.0, dtype=tl.float32)
        if HAS_G:
            decay = tl.exp(tl.load(g + tk, mask=m_tk, other=0.0).to(tl.float32))
        qd = b_q * decay
        d_qd = scale * tl.dot(do, tl.trans(s_kv), input_precision="ieee")
        tl.store(d_q + tk, d_qd * decay, mask=m_tk)
        tl.store(d_g + tk, d_qd * qd, mask=m_tk)
        d_s_kv += scale * tl.dot(tl.trans(qd), do, input_precision="ieee")
    parts = (i_s * tl.num_programs(2) + i_bh) * K * V
    tl.store(d_s_parts + parts + rk[:, None] * V + rv[None, :], d_s_kv, mask=m_kv)


_FORWARD = {"torch": naive_state_correction, "triton": _triton_forward}
_BACKWARD = {"torch": _torch_backward, "triton": _triton_backward}
