"""Chunked PyTorch form of the diagonal/scalar-decay recurrence: matmul-based, linear in T.

Tokens are grouped into chunks of C. Within a chunk the output is a masked (C, C) attention;
across chunks a (K, V) state is carried by a short scan over T / C steps:

    o_i   = scale * (q_i * exp(bq_i)) S_in + scale * sum_{j in chunk} A_ij v_j
    S_out = exp(b_last) * S_in + sum_j (k_j * exp(b_last - b_j))^T v_j

with ``b`` the inclusive in-chunk cumulative log-decay, and ``bq = b`` (or ``b - g`` when the RWKV6
bonus ``u`` replaces the diagonal term). Every exponent is a sum of log-decays over a forward span,
so it is <= 0 and exp never overflows, even for decays like g = -5 per step:

* no decay: ``A = tril(q k^T)``;
* scalar decay: ``A = q k^T * exp(bq_i - b_j)`` built as a (C, C) matrix, masked before exp;
* diagonal decay: each chunk is split into sub-chunks of c tokens. Between sub-chunks J < I the
  decay factors into three spans, each exp(<= 0): ``q_i exp(bq_i - r_I)`` (start of I to i),
  ``exp(r_I - e_J)`` (end of J to start of I) and ``k_j exp(e_J - b_j)`` (j to end of J); one
  matmul per I. Inside a sub-chunk the same factors plus exp(r - e) <= exp(60) give one matmul;
  sub-chunks that decay by more than that are rebuilt band by band from running products of
  exp(g), which stay in [0, 1].
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from linear_moe.kernels.gla.checks import check_gla_inputs, decay_kind


def chunk_gla(
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
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same contract as :func:`linear_moe.kernels.gla.gla`; differentiable by plain autograd.

    Packed sequences (``cu_seqlens``) are padded into a batch (N, T_max) and unpadded afterwards;
    padding has k = v = 0 and g = 0, so it changes neither outputs nor final states.
    """
    N = check_gla_inputs(q, k, v, g, u, initial_state, cu_seqlens)
    if chunk_size < 1:
        raise ValueError(f"gla: chunk_size must be >= 1, got {chunk_size}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if cu_seqlens is None:
        o_BTHV, state_NHKV = _chunk_segments(q, k, v, g, u, scale, initial_state, chunk_size)
    else:
        idx_NL, valid_NL = _pack_index(cu_seqlens, N)
        pad = lambda x: None if x is None else _pad_packed(x[0], idx_NL, valid_NL)  # noqa: E731
        o_NLHV, state_NHKV = _chunk_segments(pad(q), pad(k), pad(v), pad(g), u, scale, initial_state, chunk_size)
        o_BTHV = o_NLHV[valid_NL][None]
    return o_BTHV.to(v.dtype), (state_NHKV if output_final_state else None)


def _pack_index(cu_seqlens: torch.Tensor, N: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather index (N, L) into the packed T axis and its validity mask, L = longest sequence."""
    starts_N = cu_seqlens[:-1].long()
    lengths_N = cu_seqlens[1:].long() - starts_N
    L = int(lengths_N.max()) if N else 0
    pos_L = torch.arange(L, device=cu_seqlens.device)
    valid_NL = pos_L[None, :] < lengths_N[:, None]
    idx_NL = torch.where(valid_NL, starts_N[:, None] + pos_L[None, :], 0)
    return idx_NL, valid_NL


def _pad_packed(x_T: torch.Tensor, idx_NL: torch.Tensor, valid_NL: torch.Tensor) -> torch.Tensor:
    """(T, ...) packed -> (N, L, ...) zero-padded."""
    x_NL = x_T[idx_NL]
    mask = valid_NL.reshape(*valid_NL.shape, *([1] * (x_NL.dim() - 2)))
    return torch.where(mask, x_NL, torch.zeros((), dtype=x_NL.dtype, device=x_NL.device))


class ChunkDecay(NamedTuple):
    """Per-chunk decay factors, all in fp32 and all exp(<= 0).

    intra: v (B, H, N, C, V) -> intra-chunk output (scale not applied), causal within each chunk.
    q_in: q-side factor for S_in, broadcastable to (B, H, N, C, K).
    k_out: k-side factor towards the chunk end, broadcastable to (B, H, N, C, K).
    chunk: whole-chunk decay, broadcastable to (B, H, N, K, V); None without decay.
    """

    intra: Callable[[torch.Tensor], torch.Tensor]
    q_in: torch.Tensor | float
    k_out: torch.Tensor | float
    chunk: torch.Tensor | None


#: tokens per segment: longer sequences run segment by segment, the state handed on between them,
#: so the (B, H, T/C, C, C)-sized intermediates stay cache-sized (T=8192: 1.45x faster than whole)
SEGMENT_TOKENS = 2048


def _chunk_segments(q, k, v, g, u, scale, initial_state, C):
    """:func:`_chunk_batch` over chunk-aligned segments of about SEGMENT_TOKENS tokens."""
    T = q.shape[1]
    seg = max(C, SEGMENT_TOKENS // C * C)
    if T <= seg:
        return _chunk_batch(q, k, v, g, u, scale, initial_state, C)
    outs, state = [], initial_state
    for start in range(0, T, seg):
        part = slice(start, start + seg)
        o, state = _chunk_batch(q[:, part], k[:, part], v[:, part], None if g is None else g[:, part], u, scale,
                                state, C)
        outs.append(o)
    return torch.cat(outs, dim=1), state


def _chunk_batch(q, k, v, g, u, scale, initial_state, C):
    """(B, T, H, *) -> o (B, T, H, V) fp32, final state (B, H, K, V) fp32."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    Tp = max(-(-T // C), 1) * C  # at least one (all-padding) chunk, so T = 0 needs no special case
    NC = Tp // C

    def blocks(x):  # (B, T, H, ...) -> (B, H, NC, C, ...) fp32, zero-padded along T
        x = x.float().movedim(1, 2)
        if Tp > T:
            x = F.pad(x, (0, 0) * (x.dim() - 3) + (0, Tp - T))
        return x.contiguous().reshape(B, H, NC, C, *x.shape[3:])

    q_BHNCK, k_BHNCK, v_BHNCV = blocks(q), blocks(k), blocks(v)
    g_blocks = None if g is None else blocks(g)
    decay = DECAYS[decay_kind(g)](q_BHNCK, k_BHNCK, g_blocks, u is not None)

    o_BHNCV = decay.intra(v_BHNCV)
    if u is not None:
        bonus_BHNC1 = (q_BHNCK * k_BHNCK * u.float()[None, :, None, None, :]).sum(-1, keepdim=True)
        o_BHNCV = o_BHNCV + bonus_BHNC1 * v_BHNCV

    kv_BHNKV = _bmm((k_BHNCK * decay.k_out).transpose(-1, -2), v_BHNCV)
    state_BHKV = q.new_zeros(B, H, K, V, dtype=torch.float32)
    if initial_state is not None:
        state_BHKV = state_BHKV + initial_state.float()
    states_in = []
    for n in range(NC):
        states_in.append(state_BHKV)
        carried = state_BHKV if decay.chunk is None else state_BHKV * decay.chunk[:, :, n]
        state_BHKV = carried + kv_BHNKV[:, :, n]
    S_in_BHNKV = torch.stack(states_in, dim=2)
    o_BHNCV = o_BHNCV + _bmm(q_BHNCK * decay.q_in, S_in_BHNKV)
    o_BTHV = (scale * o_BHNCV).reshape(B, H, Tp, V)[:, :, :T].movedim(2, 1)
    return o_BTHV, state_BHKV


def _bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for equal leading dims via one ``torch.bmm`` (``@`` copies transposed operands)."""
    lead = a.shape[:-2]
    out = torch.bmm(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]))
    return out.reshape(*lead, *out.shape[-2:])


def _causal_mask(C: int, strict: bool, device) -> torch.Tensor:
    """(C, C) bool, True where key j may reach query i (j <= i, or j < i when ``strict``)."""
    return torch.ones(C, C, dtype=torch.bool, device=device).tril(-1 if strict else 0)


def _no_decay(q, k, g, has_u: bool) -> ChunkDecay:
    """g is None: plain causal (C, C) attention, no decay factors."""
    mask_CC = _causal_mask(q.shape[-2], has_u, q.device)
    A = _bmm(q, k.transpose(-1, -2)).masked_fill(~mask_CC, 0.0)
    return ChunkDecay(lambda v: _bmm(A, v), 1.0, 1.0, None)


def _scalar_decay(q, k, g_BHNC, has_u: bool) -> ChunkDecay:
    """One log-decay per head and token: the (C, C) decay matrix, no K-sized decay tensor."""
    # Cumulative sums in fp64: differences b_i - b_j of sums reaching |C * g| keep full precision.
    b = g_BHNC.double().cumsum(-1)
    bq = b - g_BHNC.double() if has_u else b
    mask_CC = _causal_mask(q.shape[-2], has_u, q.device)
    rel = (bq[..., :, None] - b[..., None, :]).masked_fill(~mask_CC, float("-inf"))
    A = _bmm(q, k.transpose(-1, -2)) * rel.exp().float()
    q_in = bq.exp().float()[..., None]
    k_out = (b[..., -1:] - b).exp().float()[..., None]
    chunk = b[..., -1].exp().float()[..., None, None]
    return ChunkDecay(lambda v: _bmm(A, v), q_in, k_out, chunk)


def _diagonal_decay(q, k, g, has_u: bool, sub: int = 16) -> ChunkDecay:
    """Stable diagonal decay via sub-chunks of ``sub`` tokens (see the module docstring)."""
    *lead, C, K = q.shape
    c = min(sub, C)
    while C % c:
        c -= 1
    n = C // c
    q_s, k_s, g_s = (x.reshape(*lead, n, c, K) for x in (q, k, g))
    # in-sub-chunk inclusive cumsum b_loc, its q-side version, and the suffix sum after each token
    b_loc = g_s.cumsum(-2)
    bq_loc = b_loc - g_s if has_u else b_loc
    tot_n = b_loc[..., -1, :]
    suffix_loc = tot_n[..., None, :] - b_loc
    incl_n = tot_n.cumsum(-2)
    before_n = F.pad(incl_n, (0, 0, 1, 0))[..., :-1, :]  # shifted copy: exactly 0 between neighbours
    # sub-chunk J < I: decay from the end of J to the start of I, exp(<= 0); J >= I gets weight 0
    later_IJ = torch.ones(n, n, dtype=torch.bool, device=q.device).tril(-1)
    between_IJK = before_n[..., :, None, :] - incl_n[..., None, :, :]
    between_IJK = between_IJK.masked_fill(~later_IJ[..., None], float("-inf"))
    k_end = k_s * suffix_loc.exp()  # k_j exp(e_J - b_j)
    k_tilde = (k_end[..., None, :, :, :] * between_IJK.exp()[..., None, :]).reshape(*lead, n, C, K)
    q_tilde = q_s * bq_loc.exp()  # q_i exp(bq_i - r_I)
    A_inter = _bmm(q_tilde, k_tilde.transpose(-1, -2)).reshape(*lead, C, C)
    A_diag = _sub_chunk_factored(q_tilde, k_end, tot_n, has_u)
    strong_n = tot_n.amin(-1) < -SAFE_LOG_DECAY  # (.., n): sub-chunks the factored form can't hold
    if bool(strong_n.any()):
        A_strong = _sub_chunk_banded(q_s[strong_n], k_s[strong_n], g_s[strong_n], has_u)
        A_diag = A_diag.masked_fill(strong_n[..., None, None], 0.0).index_put((strong_n,), A_strong)

    def intra(v: torch.Tensor) -> torch.Tensor:
        o_diag = _bmm(A_diag, v.reshape(*v.shape[:-2], n, c, v.shape[-1]))
        return _bmm(A_inter, v) + o_diag.reshape(v.shape)

    bq_chunk = (bq_loc + before_n[..., None, :]).reshape(*lead, C, K)
    suffix_chunk = (suffix_loc + (incl_n[..., -1:, :] - incl_n)[..., None, :]).reshape(*lead, C, K)
    return ChunkDecay(intra, bq_chunk.exp(), suffix_chunk.exp(), incl_n[..., -1, :].exp()[..., None])


#: sub-chunks whose total log-decay reaches below -SAFE_LOG_DECAY (in any K channel) take the banded
#: path; above it the factored form's largest factor, exp(SAFE_LOG_DECAY) ~ 1e26, fits in fp32
SAFE_LOG_DECAY = 60.0


def _sub_chunk_factored(q_tilde, k_end, tot_n, has_u: bool) -> torch.Tensor:
    """(.., n, c, K) -> (.., n, c, c) weights inside each sub-chunk as one matmul.

    ``q_i exp(bq_i - r) exp(r - e) . k_j exp(e - b_j)`` with r, e the sub-chunk's start and end: the
    middle factor is exp(-total) <= exp(SAFE_LOG_DECAY) (clamped; larger totals are replaced by the
    banded form).
    """
    c = q_tilde.shape[-2]
    q_e = q_tilde * (-tot_n).clamp(max=SAFE_LOG_DECAY).exp()[..., None, :]
    mask_cc = _causal_mask(c, has_u, q_tilde.device)
    return _bmm(q_e, k_end.transpose(-1, -2)).masked_fill(~mask_cc, 0.0)


def _sub_chunk_banded(q_s, k_s, g_s, has_u: bool) -> torch.Tensor:
    """(.., n, c, K) -> (.., n, c, c) weights inside each sub-chunk, one diagonal band at a time.

    Band d holds pairs (i, i - d); its decay is a running product of exp(g) over (i - d, i]
    (or (i - d, i - 1] with ``u``), so it never leaves [0, 1]. Shifted operands are views into
    front-padded copies; positions i - d < 0 read zeros.
    """
    c = q_s.shape[-2]
    pad = lambda x: F.pad(x, (0, 0, c, 0))  # noqa: E731
    k_pad, eg_pad = pad(k_s), pad(g_s.exp())
    shifted = lambda x_pad, d: x_pad[..., c - d : 2 * c - d, :]  # noqa: E731  row i holds x_{i-d}
    first = 1 if has_u else 0
    bands, q_w = [], q_s
    for d in range(first, c):
        if d > first:
            q_w = q_w * shifted(eg_pad, d - 1)  # q_i times the decay product of band d
        bands.append(torch.linalg.vecdot(q_w, shifted(k_pad, d)))
    # (.., n, c, c): band_ncd[.., i, d]; band 0 is absent with u (and every band when c = 1)
    band_ncd = F.pad(torch.stack(bands, dim=-1) if bands else q_s.new_zeros(*q_s.shape[:-1], 0), (first, 0))
    # A[i, j] = band[i, i - j] for j <= i (j < i with u): gather along the band axis
    i_idx = torch.arange(c, device=q_s.device)
    offset_cc = i_idx[:, None] - i_idx[None, :]
    valid_cc = offset_cc >= first
    A = band_ncd.gather(-1, offset_cc.clamp(min=0).expand(*band_ncd.shape[:-2], c, c))
    return A.masked_fill(~valid_cc, 0.0)


#: decay kind -> builder of the per-chunk factors, called as
#: ``builder(q, k, g, has_u)`` with q, k (B, H, N, C, K) and g (B, H, N, C[, K]) or None

DECAYS: dict[str, Callable[..., ChunkDecay]] = {
    "none": _no_decay,
    "scalar": _scalar_decay,
    "diagonal": _diagonal_decay,
}
