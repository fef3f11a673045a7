"""Token-local pieces of a mixer under sequence parallelism: the halo and global positions.

Short convolutions and token shift read the ``W - 1`` tokens before each position. On SP rank r
the first ones live on earlier ranks: :func:`previous_tokens` fetches them with ONE differentiable
all-gather of every rank's tail (``(B, W - 1, C)`` per rank, whatever T is) and zeroes those that
precede the document of the chunk's first token. RoPE and retention need global positions:
:func:`global_positions`.

Packed input under SP carries the *global* document offsets ``cu_seqlens`` (B == 1), as the LASP-2
cores do; :func:`local_offsets` clips them to this rank's chunk.
"""
from __future__ import annotations

import torch

from linear_moe.model.parallel.collectives import all_gather_sequence
from linear_moe.model.parallel.sequence_parallel import (
    SequenceParallelContext,
    current_sequence_parallel,
    local_segments,
)


def active_sequence_parallel() -> SequenceParallelContext | None:
    """The current context when it splits the sequence over more than one rank, else None."""
    ctx = current_sequence_parallel()
    return ctx if ctx.size > 1 else None


def local_offsets(cu_seqlens: torch.Tensor | None, ctx: SequenceParallelContext, t_local: int) -> torch.Tensor | None:
    """Global offsets clipped to this rank's chunk ``(N_local + 1,)``; the first local document may
    continue one from the previous rank. None stays None."""
    return local_segments(cu_seqlens, ctx.rank, t_local).cu_seqlens


def document_start(cu_seqlens: torch.Tensor | None, position: int) -> int:
    """Global start of the document holding token ``position`` (0 without packing)."""
    if cu_seqlens is None:
        return 0
    return max(int(b) for b in cu_seqlens.tolist() if int(b) <= position)


def previous_tokens(x_BTC: torch.Tensor, width: int, cu_seqlens: torch.Tensor | None,
                    ctx: SequenceParallelContext) -> torch.Tensor:
    """``(B, width, C)``: the ``width`` global tokens before this rank's chunk, differentiable.

    Zero before the global sequence start and before the start of the document that holds the
    chunk's first token, so a document never reads another one. Chunks shorter than ``width``
    work too: every rank sends its last ``min(width, T_local)`` tokens and the halo is assembled
    from all earlier ranks.
    """
    B, T, C = x_BTC.shape
    if width == 0:
        return x_BTC.new_zeros(B, 0, C)
    tail = min(width, T)
    gathered_BLC = all_gather_sequence(x_BTC[:, T - tail:], ctx.group, dim=1)  # (B, W_sp * tail, C)
    before_BLC = gathered_BLC[:, : ctx.rank * tail]
    pad = width - before_BLC.shape[1]
    if pad > 0:
        before_BLC = torch.cat([before_BLC.new_zeros(B, pad, C), before_BLC], dim=1)
    halo_BWC = before_BLC[:, before_BLC.shape[1] - width:]
    start = ctx.rank * T
    positions_W = torch.arange(start - width, start, device=x_BTC.device)
    keep_W = positions_W >= document_start(cu_seqlens, start)  # also drops positions < 0
    return halo_BWC * keep_W.to(halo_BWC.dtype)[None, :, None]


def global_positions(x_BT: torch.Tensor, cu_seqlens: torch.Tensor | None, ctx: SequenceParallelContext) -> torch.Tensor:
    """``(B, T_local)`` int64 positions of this rank's tokens in their (global) sequence or document."""
    B, T = x_BT.shape[:2]
    start = ctx.rank * T
    pos_T = torch.arange(start, start + T, device=x_BT.device)
    if cu_seqlens is not None:
        bounds_N = cu_seqlens[:-1].to(x_BT.device)
        doc_T = torch.bucketize(pos_T, cu_seqlens[1:].to(x_BT.device), right=True)
        pos_T = pos_T - bounds_N[doc_T]
    return pos_T.expand(B, T)
