"""Sequence parallelism: generalised LASP-2 for every linear recurrence, LASP-2H for softmax attention.

Each SP rank holds one contiguous chunk of the sequence, ``(B, T_local, H, .)`` with the same
``T_local`` on every rank (rank r holds tokens ``[r * T_local, (r + 1) * T_local)``). Per layer:

1. the rank runs its chunk from a zero state: output ``o_local`` and final state ``b_r``; the
   chunk's transition ``a_r`` is a vector (B, H, K) of cumulative decays (identity, fixed, scalar
   and diagonal decays) or a (B, H, K, K) matrix (delta rules), so ``S_out = a_r(S_in) + b_r``;
2. ONE all-gather of ``(a_r, b_r)``: B x H x (K V + K or K K) floats per rank, whatever T is;
3. a prefix composition of the gathered maps gives the rank its true incoming state ``S_in``;
4. decay families add ``scale * (q * exp(cumsum g)) @ S_in`` to ``o_local`` (the fused state
   correction); delta rules rerun the chunk with ``initial_state=S_in``.

The backward pass all-gathers the incoming-state gradients once and runs the suffix composition.

Packed sequences (``cu_seqlens``, B == 1) give the *global* document offsets; documents may cross
rank boundaries and the state resets at each document start, so a rank whose chunk contains a
document start (after its first token) passes ``a_r = 0`` on, and one whose chunk ends exactly at
a document boundary passes ``(0, 0)``.

Mixers call these through :class:`SequenceParallelContext` (see :func:`use_sequence_parallel`).
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F

from linear_moe.kernels.lasp import prefix_compose_states, resolve_lasp_backend, state_correction, suffix_compose
from linear_moe.model.parallel.collectives import all_gather_sequence, all_gather_stacked


# ------------------------------------------------------------------------------------ context
@dataclass(frozen=True)
class SequenceParallelContext:
    """The SP process group (None: no sequence parallelism) and the LASP state-kernel backend."""

    group: dist.ProcessGroup | None = None
    lasp_backend: str = "auto"  # auto | torch | triton, see kernels/lasp/backend.py

    @property
    def size(self) -> int:
        return 1 if self.group is None else dist.get_world_size(self.group)

    @property
    def rank(self) -> int:
        return 0 if self.group is None else dist.get_rank(self.group)

    def local_slice(self, total_length: int) -> slice:
        """Token range ``[rank * T_local, (rank + 1) * T_local)`` this rank holds."""
        if total_length % self.size:
            raise ValueError(f"sequence length {total_length} must be divisible by the SP size {self.size}")
        t_local = total_length // self.size
        return slice(self.rank * t_local, (self.rank + 1) * t_local)

    def gla(self, *args, **kwargs):
        return lasp2_gla(*args, group=self.group, lasp_backend=self.lasp_backend, **kwargs)

    def delta_rule(self, *args, **kwargs):
        return lasp2_delta_rule(*args, group=self.group, lasp_backend=self.lasp_backend, **kwargs)

    def dplr(self, *args, **kwargs):
        return lasp2_dplr(*args, group=self.group, lasp_backend=self.lasp_backend, **kwargs)

    def attention(self, *args, **kwargs):
        return lasp2_attention(*args, group=self.group, **kwargs)


_CURRENT: contextvars.ContextVar[SequenceParallelContext] = contextvars.ContextVar(
    "sequence_parallel", default=SequenceParallelContext())


def current_sequence_parallel() -> SequenceParallelContext:
    """The context set by :func:`use_sequence_parallel` (default: no SP)."""
    return _CURRENT.get()


@contextlib.contextmanager
def use_sequence_parallel(context: SequenceParallelContext) -> Iterator[SequenceParallelContext]:
    """Make mixers inside the block route their cores through ``context``."""
    token = _CURRENT.set(context)
    try:
        yield context
    finally:
        _CURRENT.reset(token)


# ------------------------------------------------------------------------------------ packing
@dataclass(frozen=True)
class LocalSegments:
    """How the global document offsets cut this rank's chunk."""

    cu_seqlens: torch.Tensor | None  # local offsets (N_local + 1,), None without packing
    first_length: int  # tokens before the first document start after the chunk start
    single_segment: bool  # no document starts strictly inside the chunk
    carries_out: bool  # the document at the chunk end continues on the next rank


def local_segments(cu_seqlens: torch.Tensor | None, rank: int, t_local: int) -> LocalSegments:
    """Clip the global offsets ``cu_seqlens`` to ``[rank * t_local, (rank + 1) * t_local)``."""
    if cu_seqlens is None:
        return LocalSegments(None, t_local, True, True)
    start, end = rank * t_local, (rank + 1) * t_local
    bounds = [int(b) for b in cu_seqlens.tolist()]
    inner = [b - start for b in bounds if start < b < end]
    local = torch.tensor([0, *inner, t_local], dtype=cu_seqlens.dtype, device=cu_seqlens.device)
    carries_out = end not in bounds
    return LocalSegments(local, inner[0] if inner else t_local, not inner, carries_out)


# ------------------------------------------------------------------------------------ state exchange
def exchange_states(a_r: torch.Tensor, b_r: torch.Tensor, s0: torch.Tensor, group, lasp_backend: str = "auto",
                    with_final: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """All-gather every rank's ``(a_r, b_r)`` once and compose: ``(S_in, S_final)`` (B, H, K, V) fp32.

    a_r: (B, H, K) or (B, H, K, K); b_r, s0: (B, H, K, V). ``S_final`` is the state after the whole
    sequence (replicated). Gradients flow to a_r, b_r and s0 (whole on rank 0, zero elsewhere, so
    that summing a replicated ``s0``'s gradient over ranks is exact). ``with_final`` (the same on
    every rank) makes the backward all-gather carry ``S_final``'s gradients too, summed over ranks.
    """
    return _StateExchange.apply(a_r, b_r, s0, group, resolve_lasp_backend(lasp_backend, b_r), with_final)


class _StateExchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a_r, b_r, s0, group, backend, with_final):
        ctx.set_materialize_grads(False)
        ctx.with_final = with_final
        rank = dist.get_rank(group)
        n_a = a_r.numel()
        packed = torch.cat([a_r.float().reshape(-1), b_r.float().reshape(-1)])
        gathered = all_gather_stacked(packed, group)  # (W, n_a + n_b): the one collective per layer
        a_W = gathered[:, :n_a].reshape(-1, *a_r.shape)
        b_W = gathered[:, n_a:].reshape(-1, *b_r.shape)
        states = prefix_compose_states(a_W, b_W, s0.float(), backend)  # (W + 1, B, H, K, V)
        ctx.save_for_backward(a_W, states)
        ctx.group, ctx.backend, ctx.rank = group, backend, rank
        ctx.dtypes = (a_r.dtype, b_r.dtype, s0.dtype)
        return states[rank], states[-1]

    @staticmethod
    def backward(ctx, d_s_in, d_s_final):
        a_W, states = ctx.saved_tensors
        zeros = torch.zeros_like(states[0])
        parts = [zeros if d_s_in is None else d_s_in.float()]
        if ctx.with_final:
            parts.append(zeros if d_s_final is None else d_s_final.float())
        gathered = all_gather_stacked(torch.stack(parts), ctx.group)  # (W, 1 or 2, B, H, K, V)
        final = gathered[:, 1].sum(0) if ctx.with_final else zeros
        d_states = torch.cat([gathered[:, 0], final[None]])
        d_a, d_b, d_s0 = suffix_compose(a_W, states, d_states, ctx.backend)
        r = ctx.rank
        d_s0 = d_s0 if r == 0 else torch.zeros_like(d_s0)
        return d_a[r].to(ctx.dtypes[0]), d_b[r].to(ctx.dtypes[1]), d_s0.to(ctx.dtypes[2]), None, None, None


# ------------------------------------------------------------------------------------ LSM cores
def lasp2_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    *,
    group=None,
    u: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
    chunk_size: int = 64,
    lasp_backend: str = "auto",
    op: Callable | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``linear_moe.kernels.gla.gla`` over a sequence split across the SP ``group``.

    q, k: (B, T_local, H, K); v: (B, T_local, H, V); g: (B, T_local, H, K), (B, T_local, H) or None;
    u: (H, K) RWKV6 bonus or None.
    cu_seqlens: *global* offsets of packed documents (B == 1). initial_state: (B, H, K, V) state
    before the global sequence (not with cu_seqlens). Returns this rank's output and, if asked, the
    global final state (B, H, K, V), the same on every rank (not with cu_seqlens). ``op`` swaps the
    core (default: ``gla``), e.g. for a reference implementation with the same signature.
    """
    if op is None:
        from linear_moe.kernels.gla import gla as op
    if group is None or dist.get_world_size(group) == 1:
        return op(q, k, v, g, u=u, scale=scale, initial_state=initial_state,
                  output_final_state=output_final_state, cu_seqlens=cu_seqlens, backend=backend,
                  chunk_size=chunk_size)
    B, T, H, K = q.shape
    scale = K ** -0.5 if scale is None else scale
    seg = _segments(cu_seqlens, initial_state, output_final_state, group, B, T)
    o_local, s_last = op(q, k, v, g, u=u, scale=scale, output_final_state=True, cu_seqlens=seg.cu_seqlens,
                         backend=backend, chunk_size=chunk_size)
    g_first = None if g is None else g[:, : seg.first_length].float()
    if g_first is not None and g_first.ndim == 3:
        g_first = g_first.unsqueeze(-1).expand(-1, -1, -1, K)
    gcum = None if g_first is None else g_first.cumsum(1)  # (B, T_first, H, K)
    a_r = q.new_ones((B, H, K), dtype=torch.float32) if gcum is None else gcum[:, -1].exp()
    a_r, b_r = _mask_map(a_r, s_last[-B:], seg)
    s0 = _initial(initial_state, B, H, K, v.shape[-1], q)
    s_in, s_final = exchange_states(a_r, b_r, s0, group, lasp_backend, output_final_state)
    # with the RWKV6 bonus u, token t reads S_{t-1}: its decay from S_in excludes g_t
    gread = gcum if u is None or gcum is None else gcum - g_first
    first = state_correction(o_local[:, : seg.first_length], q[:, : seg.first_length], gread, s_in, scale,
                             backend=lasp_backend)
    o = first if seg.first_length == T else torch.cat([first, o_local[:, seg.first_length:]], dim=1)
    return o, (s_final if output_final_state else None)


def lasp2_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None = None,
    *,
    group=None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
    chunk_size: int = 64,
    lasp_backend: str = "auto",
    op: Callable | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``linear_moe.kernels.delta_rule.delta_rule`` (gated when ``g`` is given) across the SP group.

    Shapes as :func:`lasp2_gla` with beta, g: (B, T_local, H). The transition ``a_r`` (K x K) and
    ``b_r`` come from ONE zero-state pass with values ``[v, 0]`` and initial state ``[0, I]``: the
    last K columns of its final state are ``a_r``. The output is a rerun from ``S_in``.
    """
    if op is None:
        from linear_moe.kernels.delta_rule import delta_rule as op
    common = dict(scale=scale, backend=backend, chunk_size=chunk_size)
    if group is None or dist.get_world_size(group) == 1:
        return op(q, k, v, beta, g, initial_state=initial_state, output_final_state=output_final_state,
                  cu_seqlens=cu_seqlens, **common)
    B, T, H, K = q.shape
    V = v.shape[-1]
    seg = _segments(cu_seqlens, initial_state, output_final_state, group, B, T)
    n_seq = B if seg.cu_seqlens is None else len(seg.cu_seqlens) - 1
    eye = torch.eye(K, device=q.device, dtype=torch.float32).expand(n_seq, H, K, K)
    init_aug = torch.cat([eye.new_zeros(n_seq, H, K, V), eye], dim=-1)
    v_aug = torch.cat([v, v.new_zeros(B, T, H, K)], dim=-1)
    _, s_aug = op(q, k, v_aug, beta, g, initial_state=init_aug, output_final_state=True,
                  cu_seqlens=seg.cu_seqlens, **common)
    a_r, b_r = _mask_map(s_aug[-B:, ..., V:], s_aug[-B:, ..., :V], seg)
    s0 = _initial(initial_state, B, H, K, V, q)
    s_in, s_final = exchange_states(a_r, b_r, s0, group, lasp_backend, output_final_state)
    if seg.cu_seqlens is not None:  # only the first local document continues from S_in
        s_in = torch.cat([s_in, s_in.new_zeros(n_seq - 1, H, K, V)])
    o, _ = op(q, k, v, beta, g, initial_state=s_in, cu_seqlens=seg.cu_seqlens, **common)
    return o, (s_final if output_final_state else None)


def lasp2_dplr(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    gk: torch.Tensor,
    *,
    group=None,
    lasp_backend: str = "auto",
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``linear_moe.kernels.dplr.dplr`` (the RWKV7 core) across the SP group.

    q, k, a, b, gk: (B, T_local, H, K); v: (B, T_local, H, V); other keywords as
    :func:`lasp2_delta_rule`. The DPLR transition ``diag(exp(gk)) + b a^T`` acts on the key axis like
    the delta rule's, so the same augmented zero-state pass yields the (K x K) chunk map.
    """
    from linear_moe.kernels.dplr import dplr

    def op(q_, k_, v_, _beta, _g, **op_kwargs):
        return dplr(q_, k_, v_, a, b, gk, **op_kwargs)

    return lasp2_delta_rule(q, k, v, None, None, group=group, lasp_backend=lasp_backend, op=op, **kwargs)


def _segments(cu_seqlens, initial_state, output_final_state, group, B: int, T: int) -> LocalSegments:
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"sequence parallel: packed input (cu_seqlens) needs B == 1, got B={B}")
        if initial_state is not None or output_final_state:
            raise ValueError("sequence parallel: initial_state / output_final_state are per document with "
                             "cu_seqlens and are not supported across SP ranks; pass None / False")
        total = T * dist.get_world_size(group)
        if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != total:
            raise ValueError(f"sequence parallel: cu_seqlens must be the GLOBAL offsets from 0 to "
                             f"T_local * SP = {total}, got {cu_seqlens.tolist()}")
    return local_segments(cu_seqlens, dist.get_rank(group), T)


def _mask_map(a_r: torch.Tensor, b_r: torch.Tensor, seg: LocalSegments) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero what a document boundary cuts: a_r after an inner document start, both at a chunk-end reset.

    Multiplying by zero (not ``zeros_like``) keeps the exchange in the autograd graph on every rank,
    so that its backward all-gather runs everywhere.
    """
    if not seg.carries_out:
        return a_r * 0, b_r * 0
    return (a_r if seg.single_segment else a_r * 0), b_r


def _initial(initial_state, B: int, H: int, K: int, V: int, ref: torch.Tensor) -> torch.Tensor:
    if initial_state is None:
        return ref.new_zeros((B, H, K, V), dtype=torch.float32)
    if tuple(initial_state.shape) != (B, H, K, V):
        raise ValueError(f"sequence parallel: initial_state must be (B, H, K, V)={(B, H, K, V)}, "
                         f"got {tuple(initial_state.shape)}")
    return initial_state


# ------------------------------------------------------------------------------------ attention
def lasp2_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group=None,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal softmax attention of the local queries over the all-gathered K and V (LASP-2H).

    q: (B, T_local, H, D); k, v: (B, T_local, H_kv, D) with H_kv dividing H (GQA). cu_seqlens:
    global document offsets (B == 1); tokens attend only within their document. Masks use global
    positions: rank r's queries sit at ``r * T_local + t``. Returns (B, T_local, H, D).
    """
    W = 1 if group is None else dist.get_world_size(group)
    rank = 0 if group is None else dist.get_rank(group)
    B, T, H, D = q.shape
    if H % k.shape[2]:
        raise ValueError(f"lasp2_attention: kv heads {k.shape[2]} must divide query heads {H}")
    if W > 1:
        k, v = all_gather_sequence(k, group), all_gather_sequence(v, group)
    q_pos = rank * T + torch.arange(T, device=q.device)
    k_pos = torch.arange(T * W, device=q.device)
    mask = k_pos[None, :] <= q_pos[:, None]
    if cu_seqlens is not None:
        doc = torch.bucketize(k_pos, cu_seqlens[1:].to(q.device), right=True)
        mask &= doc[None, :] == doc[q_pos][:, None]
    rep = H // k.shape[2]
    k, v = (x.repeat_interleave(rep, dim=2) if rep > 1 else x for x in (k, v))
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       attn_mask=mask, scale=scale)
    return o.transpose(1, 2)
