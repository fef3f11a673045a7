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
#: the forward's (T, V) tile (S's (K, BV) block stays in registers)
_BT, _BV_FWD = 16, 64


def _triton_forward(o, q, gcum, s, scale):
    B, T, H, K = q.shape
    V = o.shape[-1]
    o = o.contiguous()  # the kernel addresses (B, T, H, V) row-major; chunked cores return strided views
    out = torch.empty_like(o)
    g = q if gcum is None else gcum.contiguous()  # unused pointer when HAS_G is False
    BV = min(_BV_FWD, block(V))
    _correction_fwd_kernel[(triton.cdiv(T, _BT), triton.cdiv(V, BV), B * H)](
        o, q.contiguous(), g, s.contiguous(), out, T, H, scale,
        K=K, V=V, BT=_BT, BK=block(K), BV=BV, HAS_G=gcum is not None,
    )
    return out


#: the dq kernel's (T, K) tile; the dS kernel's T rows per step and the (K, V) block each program sums
_BT_DQ, _BK_DQ = 16, 32
_BT_DS, _BK_DS, _BV_DS = 32, 64, 64


def _programs_wanted(device: torch.device) -> int:
    """About four programs per multiprocessor; 32 under the interpreter (so small test shapes split T too)."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 32


def t_splits(T: int, tiles: int, device: torch.device) -> tuple[int, int]:
    """``(splits, rows per split)`` of the dS kernel: enough T splits that ``tiles`` x splits programs fill
    the device, each split a whole number of ``_BT_DS`` steps (so no step crosses two splits)."""
    steps = triton.cdiv(T, _BT_DS)
    wanted = max(1, min(steps, triton.cdiv(_programs_wanted(device), tiles)))
    rows = triton.cdiv(steps, wanted) * _BT_DS
    return triton.cdiv(T, rows), rows


def _triton_backward(d_out, q, gcum, s, scale):
    """Two kernels: dq and dgcum per (K block, T block, b, h); dS as a split-T GEMM over
    (K block, V block, T split, b, h), whose partial sums are added here (deterministic).

    A first version ran one program per (b, h) over all of T, doing both: on an H200 (B=4, H=8,
    K=V=128, T=4096) its forward+backward took 3x PyTorch autograd's, and ptxas spills its loop.
    """
    B, T, H, K = q.shape
    V = d_out.shape[-1]
    d_out, q, s = d_out.contiguous(), q.contiguous(), s.contiguous()
    g = q if gcum is None else gcum.contiguous()  # unused pointer when HAS_G is False
    d_q = torch.empty(q.shape, device=q.device, dtype=torch.float32)
    d_g = torch.empty_like(d_q)
    bk_dq = min(_BK_DQ, block(K))
    _correction_bwd_dq_kernel[(triton.cdiv(K, bk_dq), triton.cdiv(T, _BT_DQ), B * H)](
        d_out, q, g, s, d_q, d_g, T, H, scale, K=K, V=V, BT=_BT_DQ, BK=bk_dq, BV=block(V), HAS_G=gcum is not None,
    )
    bk_ds, bv_ds = min(_BK_DS, block(K)), min(_BV_DS, block(V))
    kv_blocks = triton.cdiv(K, bk_ds) * triton.cdiv(V, bv_ds)
    splits, t_split = t_splits(T, kv_blocks * B * H, q.device)
    d_s_parts = torch.empty((splits, B * H, K, V), device=s.device, dtype=torch.float32)
    _correction_bwd_ds_kernel[(kv_blocks, splits, B * H)](
        d_out, q, g, d_s_parts, T, H, scale, t_split,
        K=K, V=V, BT=_BT_DS, BK=bk_ds, BV=bv_ds, HAS_G=gcum is not None,
    )
    return d_q, d_g, d_s_parts.sum(0).view(B, H, K, V)


@triton.jit
def _correction_fwd_kernel(o, q, g, s, out, T, H, scale, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                           BK: tl.constexpr, BV: tl.constexpr, HAS_G: tl.constexpr):
    """Grid (T blocks, V blocks, B * H): out = o + scale * (q * exp(g)) @ S for one (BT, BV) tile."""
    i_t, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)  # int64: B*T*H*K may pass 2^31
    i_b, i_h = i_bh // H, i_bh % H
    rt = i_t * BT + tl.arange(0, BT)
    rk, rv = tl.arange(0, BK), i_v * BV + tl.arange(0, BV)
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
def _correction_bwd_dq_kernel(d_out, q, g, s, d_q, d_g, T, H, scale, K: tl.constexpr, V: tl.constexpr,
                              BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_G: tl.constexpr):
    """Grid (K blocks, T blocks, B * H): d_qd = scale * dO S^T for one (BT, BK) tile; dq = d_qd * exp(g)
    and dg = d_qd * q * exp(g)."""
    i_k, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    rt = i_t * BT + tl.arange(0, BT)
    rk, rv = i_k * BK + tl.arange(0, BK), tl.arange(0, BV)
    tk = ((i_b * T + rt[:, None]) * H + i_h) * K + rk[None, :]
    tv = ((i_b * T + rt[:, None]) * H + i_h) * V + rv[None, :]
    m_tk = (rt[:, None] < T) & (rk[None, :] < K)
    # S^T's (V, BK) block, loaded transposed: a transpose in registers makes ptxas spill at K = V = 128
    s_vk = tl.load(s + i_bh * K * V + rk[None, :] * V + rv[:, None], mask=(rv[:, None] < V) & (rk[None, :] < K),
                   other=0.0).to(tl.float32)
    do = tl.load(d_out + tv, mask=(rt[:, None] < T) & (rv[None, :] < V), other=0.0).to(tl.float32)
    d_qd = scale * tl.dot(do, s_vk, input_precision="ieee")
    b_q = tl.load(q + tk, mask=m_tk, other=0.0).to(tl.float32)
    if HAS_G:
        decay = tl.exp(tl.load(g + tk, mask=m_tk, other=0.0).to(tl.float32))
        tl.store(d_q + tk, d_qd * decay, mask=m_tk)
        tl.store(d_g + tk, d_qd * b_q * decay, mask=m_tk)
    else:
        tl.store(d_q + tk, d_qd, mask=m_tk)
        tl.store(d_g + tk, d_qd * b_q, mask=m_tk)


@triton.jit
def _correction_bwd_ds_kernel(d_out, q, g, d_s_parts, T, H, scale, T_SPLIT, K: tl.constexpr, V: tl.constexpr,
                              BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_G: tl.constexpr):
    """Grid ((K blocks) x (V blocks), T splits, B * H): the partial dS = scale * sum_t (q * exp(g))^T dO
    of one (BK, BV) block over the split's rows [i_s * T_SPLIT, + T_SPLIT), into d_s_parts[i_s, b * H + h]."""
    i_kv, i_s, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    n_v = tl.cdiv(V, BV)
    rk, rv = (i_kv // n_v) * BK + tl.arange(0, BK), (i_kv % n_v) * BV + tl.arange(0, BV)
    acc = tl.zeros([BK, BV], dtype=tl.float32)
    t_start = i_s * T_SPLIT
    for t0 in range(t_start, tl.minimum(t_start + T_SPLIT, T), BT):
        rt = t0 + tl.arange(0, BT)
        kt = ((i_b * T + rt[None, :]) * H + i_h) * K + rk[:, None]  # (q * exp(g))^T loaded as a (K, T) tile
        tv = ((i_b * T + rt[:, None]) * H + i_h) * V + rv[None, :]
        m_kt = (rk[:, None] < K) & (rt[None, :] < T)
        qd_kt = tl.load(q + kt, mask=m_kt, other=0.0).to(tl.float32)
        if HAS_G:
            qd_kt = qd_kt * tl.exp(tl.load(g + kt, mask=m_kt, other=0.0).to(tl.float32))
        do = tl.load(d_out + tv, mask=(rt[:, None] < T) & (rv[None, :] < V), other=0.0).to(tl.float32)
        acc += tl.dot(qd_kt, do, input_precision="ieee")
    parts = (i_s * tl.num_programs(2) + i_bh) * K * V
    tl.store(d_s_parts + parts + rk[:, None] * V + rv[None, :], scale * acc, mask=(rk[:, None] < K) & (rv[None, :] < V))


_FORWARD = {"torch": naive_state_correction, "triton": _triton_forward}
_BACKWARD = {"torch": _torch_backward, "triton": _triton_backward}
