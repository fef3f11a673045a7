"""The fused state correction of LASP-2 for decay families.

A chunk run from a zero state gives ``o_local``; the true incoming state ``S_in`` adds
``scale * (q_t * exp(gcum_t)) @ S_in`` to each token's output, ``gcum_t`` being the inclusive
cumulative log-decay since the chunk start. One kernel reads q, gcum, S_in and o_local once.
"""
from __future__ import annotations

from dataclasses import dataclass

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
@dataclass(frozen=True)
class CorrectionTiles:
    """Tile sizes, dot precisions and warps of the three kernels.

    ``fwd_*``: the forward's (T, V) output tile and its K step; ``dq_*``: dq's (T, K) tile and its V
    step; ``ds_*``: dS's (K, V) block and its T step. A precision is ``tl.dot``'s input precision:
    ``ieee`` (fp32 FMA) or ``tf32x3`` (three TF32 tensor-core products, about fp32's accuracy); ``tf32``
    (one product, about 1e-3 relative) is there to be compared with.

    The defaults are the fastest fp32-accurate candidates of ``benchmarks.bench_lasp_tiles`` on an H200
    (Triton 3.6; B=4, H=8, K=V=128, bf16 activations): the forward in ieee, 0.32x PyTorch's time; the
    backward in tf32x3, 0.29x (ieee's best was 0.87x); relative errors at most 1.2e-6 with fp32 inputs.
    Each reduction is taken in steps (a loop, not unrolled) so that no thread holds a whole head dim of
    both operands: an FMA dot over all K = 128 at once left 32 registers and a 3.4 KB stack per thread
    under Triton 3.6, and that forward took 8.4x PyTorch's time.
    """

    fwd_bt: int = 16
    fwd_bv: int = 128
    fwd_bk: int = 32
    dq_bt: int = 64
    dq_bk: int = 64
    dq_bv: int = 128
    ds_bt: int = 32
    ds_bk: int = 64
    ds_bv: int = 64
    fwd_precision: str = "ieee"
    bwd_precision: str = "tf32x3"
    num_warps: int = 4

    def __post_init__(self):
        for name, value in vars(self).items():
            if isinstance(value, int) and name != "num_warps" and (value < 16 or value & (value - 1)):
                raise ValueError(f"CorrectionTiles.{name}={value}: tiles must be powers of two >= 16")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"CorrectionTiles.num_warps={self.num_warps}: expected 1, 2, 4, 8 or 16")
        for name in ("fwd_precision", "bwd_precision"):
            if getattr(self, name) not in ("ieee", "tf32x3", "tf32"):
                raise ValueError(f"CorrectionTiles.{name}={getattr(self, name)!r}: expected 'ieee' or 'tf32x3' "
                                 "(fp32-accurate dots), or 'tf32' (about 1e-3 relative)")


TILES = CorrectionTiles()


def launch_constexprs(K: int, V: int, has_g: bool, tiles: CorrectionTiles = TILES) -> dict[str, dict]:
    """Each kernel's constexprs at head dims (K, V): ``{"forward" | "backward_dq" | "backward_ds": {...}}``."""
    t, common = tiles, {"K": K, "V": V, "HAS_G": has_g}
    fwd, bwd = {**common, "PRECISION": t.fwd_precision}, {**common, "PRECISION": t.bwd_precision}
    return {
        "forward": {**fwd, "BT": t.fwd_bt, "BK": min(t.fwd_bk, block(K)), "BV": min(t.fwd_bv, block(V))},
        "backward_dq": {**bwd, "BT": t.dq_bt, "BK": min(t.dq_bk, block(K)), "BV": min(t.dq_bv, block(V))},
        "backward_ds": {**bwd, "BT": t.ds_bt, "BK": min(t.ds_bk, block(K)), "BV": min(t.ds_bv, block(V))},
    }


def _triton_forward(o, q, gcum, s, scale, tiles: CorrectionTiles = TILES):
    B, T, H, K = q.shape
    V = o.shape[-1]
    o = o.contiguous()  # the kernel addresses (B, T, H, V) row-major; chunked cores return strided views
    out = torch.empty_like(o)
    g = q if gcum is None else gcum.contiguous()  # unused pointer when HAS_G is False
    c = launch_constexprs(K, V, gcum is not None, tiles)["forward"]
    _correction_fwd_kernel[(triton.cdiv(T, c["BT"]), triton.cdiv(V, c["BV"]), B * H)](
        o, q.contiguous(), g, s.contiguous(), out, T, H, scale, **c, num_warps=tiles.num_warps)
    return out


def _programs_wanted(device: torch.device) -> int:
    """About four programs per multiprocessor; 32 under the interpreter (so small test shapes split T too)."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 32


def t_splits(T: int, blocks: int, device: torch.device, step: int) -> tuple[int, int]:
    """``(splits, rows per split)`` of the dS kernel: enough T splits that ``blocks`` x splits programs fill
    the device, each split a whole number of ``step`` rows (so no step crosses two splits)."""
    steps = triton.cdiv(T, step)
    wanted = max(1, min(steps, triton.cdiv(_programs_wanted(device), blocks)))
    rows = triton.cdiv(steps, wanted) * step
    return triton.cdiv(T, rows), rows


def _triton_backward(d_out, q, gcum, s, scale, tiles: CorrectionTiles = TILES):
    """Two kernels: dq and dgcum per (K block, T block, b, h); dS as a split-T GEMM over
    (K block, V block, T split, b, h), whose partial sums are added here (deterministic).

    A first version ran one program per (b, h) over all of T, doing both: on an H200 (B=4, H=8,
    K=V=128, T=4096) its forward+backward took 3x PyTorch autograd's; with these kernels it takes 0.62x.
    """
    B, T, H, K = q.shape
    V = d_out.shape[-1]
    d_out, q, s = d_out.contiguous(), q.contiguous(), s.contiguous()
    g = q if gcum is None else gcum.contiguous()  # unused pointer when HAS_G is False
    d_q = torch.empty(q.shape, device=q.device, dtype=torch.float32)
    d_g = torch.empty_like(d_q)
    c = launch_constexprs(K, V, gcum is not None, tiles)
    dq = c["backward_dq"]
    _correction_bwd_dq_kernel[(triton.cdiv(K, dq["BK"]), triton.cdiv(T, dq["BT"]), B * H)](
        d_out, q, g, s, d_q, d_g, T, H, scale, **dq, num_warps=tiles.num_warps)
    ds = c["backward_ds"]
    kv_blocks = triton.cdiv(K, ds["BK"]) * triton.cdiv(V, ds["BV"])
    splits, t_split = t_splits(T, kv_blocks * B * H, q.device, ds["BT"])
    d_s_parts = torch.empty((splits, B * H, K, V), device=s.device, dtype=torch.float32)
    _correction_bwd_ds_kernel[(kv_blocks, splits, B * H)](
        d_out, q, g, d_s_parts, T, H, scale, t_split, **ds, num_warps=tiles.num_warps)
    return d_q, d_g, d_s_parts.sum(0).view(B, H, K, V)


@triton.jit
def _correction_fwd_kernel(o, q, g, s, out, T, H, scale, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                           BK: tl.constexpr, BV: tl.constexpr, HAS_G: tl.constexpr, PRECISION: tl.constexpr):
    """Grid (T blocks, V blocks, B * H): out = o + scale * (q * exp(g)) @ S for one (BT, BV) tile,
    summed over K in steps of BK."""
    i_t, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)  # int64: B*T*H*K may pass 2^31
    i_b, i_h = i_bh // H, i_bh % H
    rt, rv = i_t * BT + tl.arange(0, BT), i_v * BV + tl.arange(0, BV)
    tv = ((i_b * T + rt[:, None]) * H + i_h) * V + rv[None, :]
    m_tv = (rt[:, None] < T) & (rv[None, :] < V)
    acc = tl.zeros([BT, BV], dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        tk = ((i_b * T + rt[:, None]) * H + i_h) * K + rk[None, :]
        m_tk = (rt[:, None] < T) & (rk[None, :] < K)
        qd = tl.load(q + tk, mask=m_tk, other=0.0).to(tl.float32)
        if HAS_G:
            qd = qd * tl.exp(tl.load(g + tk, mask=m_tk, other=0.0).to(tl.float32))
        s_kv = tl.load(s + i_bh * K * V + rk[:, None] * V + rv[None, :], mask=(rk[:, None] < K) & (rv[None, :] < V),
                       other=0.0).to(tl.float32)
        acc += tl.dot(qd, s_kv, input_precision=PRECISION)
    acc = tl.load(o + tv, mask=m_tv, other=0.0).to(tl.float32) + scale * acc
    tl.store(out + tv, acc.to(out.dtype.element_ty), mask=m_tv)


@triton.jit
def _correction_bwd_dq_kernel(d_out, q, g, s, d_q, d_g, T, H, scale, K: tl.constexpr, V: tl.constexpr,
                              BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_G: tl.constexpr,
                              PRECISION: tl.constexpr):
    """Grid (K blocks, T blocks, B * H): d_qd = scale * dO S^T for one (BT, BK) tile, summed over V in
    steps of BV; dq = d_qd * exp(g) and dg = d_qd * q * exp(g)."""
    i_k, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    rt, rk = i_t * BT + tl.arange(0, BT), i_k * BK + tl.arange(0, BK)
    tk = ((i_b * T + rt[:, None]) * H + i_h) * K + rk[None, :]
    m_tk = (rt[:, None] < T) & (rk[None, :] < K)
    d_qd = tl.zeros([BT, BK], dtype=tl.float32)
    for v0 in range(0, V, BV):
        rv = v0 + tl.arange(0, BV)
        tv = ((i_b * T + rt[:, None]) * H + i_h) * V + rv[None, :]
        # S^T's (BV, BK) block, loaded transposed: a transpose in registers makes ptxas spill at K = V = 128
        s_vk = tl.load(s + i_bh * K * V + rk[None, :] * V + rv[:, None], mask=(rv[:, None] < V) & (rk[None, :] < K),
                       other=0.0).to(tl.float32)
        do = tl.load(d_out + tv, mask=(rt[:, None] < T) & (rv[None, :] < V), other=0.0).to(tl.float32)
        d_qd += tl.dot(do, s_vk, input_precision=PRECISION)
    d_qd = scale * d_qd
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
                              BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_G: tl.constexpr,
                              PRECISION: tl.constexpr):
    """Grid ((K blocks) x (V blocks), T splits, B * H): the partial dS = scale * sum_t (q * exp(g))^T dO
    of one (BK, BV) block over the split's rows [i_s * T_SPLIT, + T_SPLIT), in steps of BT, into
    d_s_parts[i_s, b * H + h]."""
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
        acc += tl.dot(qd_kt, do, input_precision=PRECISION)
    parts = (i_s * tl.num_programs(2) + i_bh) * K * V
    tl.store(d_s_parts + parts + rk[:, None] * V + rv[None, :], scale * acc, mask=(rk[:, None] < K) & (rv[None, :] < V))


#: argument types as the LASP-2 path calls the kernels (bf16 activations; fp32 gcum, states and gradients),
#: for ahead-of-time compile checks (``kernels.resources``)
_ARGS = {"K": "constexpr", "V": "constexpr", "BT": "constexpr", "BK": "constexpr", "BV": "constexpr",
         "HAS_G": "constexpr", "PRECISION": "constexpr"}
ARG_TYPES = {
    "forward": {"o": "*bf16", "q": "*bf16", "g": "*fp32", "s": "*fp32", "out": "*bf16", "T": "i32", "H": "i32",
                "scale": "fp32", **_ARGS},
    "backward_dq": {"d_out": "*bf16", "q": "*bf16", "g": "*fp32", "s": "*fp32", "d_q": "*fp32", "d_g": "*fp32",
                    "T": "i32", "H": "i32", "scale": "fp32", **_ARGS},
    "backward_ds": {"d_out": "*bf16", "q": "*bf16", "g": "*fp32", "d_s_parts": "*fp32", "T": "i32", "H": "i32",
                    "scale": "fp32", "T_SPLIT": "i32", **_ARGS},
}
KERNELS = {"forward": _correction_fwd_kernel, "backward_dq": _correction_bwd_dq_kernel,
           "backward_ds": _correction_bwd_ds_kernel}

_FORWARD = {"torch": naive_state_correction, "triton": _triton_forward}
_BACKWARD = {"torch": _torch_backward, "triton": _triton_backward}
