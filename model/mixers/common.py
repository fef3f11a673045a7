"""Small pieces shared by the mixers: gated RMSNorm, head reshapes, packed-sequence helpers.

Packed variable-length input follows fla's convention: ``x`` is ``(1, T_total, ...)`` and
``cu_seqlens`` is a ``(N + 1,)`` int64 tensor of document boundaries starting at 0 and ending at
``T_total``; recurrent states then carry one row per document.

Under sequence parallelism (an active :class:`~linear_moe.model.parallel.SequenceParallelContext`
with more than one rank) ``x`` is this rank's contiguous chunk and ``cu_seqlens`` stays GLOBAL
(ending at ``T_local * SP``); :func:`check_varlen`, :func:`token_shift`, :func:`token_positions` and
:class:`ShortConvolution` handle the chunk boundary here, in one place (see ``model/parallel/halo.py``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from linear_moe.model.parallel.halo import (
    active_sequence_parallel,
    global_positions,
    local_offsets,
    previous_tokens,
)


class GatedRMSNorm(nn.Module):
    """``rmsnorm(x) * weight`` (``* silu(gate)`` when given) over the last dim.

    Applied per head: ``x`` is ``(..., dim)``, ``gate`` the same shape as ``x`` or None.  Computed in
    fp32 and cast back to ``x.dtype``.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        if x.shape[-1] != self.dim:
            raise ValueError(f"GatedRMSNorm: last dim of x is {x.shape[-1]}, expected {self.dim}")
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()
        if gate is not None:
            y = y * F.silu(gate.float())
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"


# ---------------------------------------------------------------------- head reshapes
def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``(B, T, H*d) -> (B, T, H, d)``."""
    return x.unflatten(-1, (num_heads, x.shape[-1] // num_heads))


def merge_heads(x_BTHd: torch.Tensor) -> torch.Tensor:
    """``(B, T, H, d) -> (B, T, H*d)``."""
    return x_BTHd.flatten(-2)


# ---------------------------------------------------------------------- packed sequences
def check_varlen(x: torch.Tensor, cu_seqlens: torch.Tensor | None) -> None:
    """Raise ``ValueError`` unless ``cu_seqlens`` fits ``x`` (``B == 1``, boundaries 0 .. T)."""
    if cu_seqlens is None:
        return
    sp = active_sequence_parallel()
    total = x.shape[1] * (1 if sp is None else sp.size)  # global offsets under SP
    if x.shape[0] != 1:
        raise ValueError(f"cu_seqlens needs packed input with batch size 1, got batch {x.shape[0]}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with at least 2 entries, got shape {tuple(cu_seqlens.shape)}")
    if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != total:
        where = "" if sp is None else f" (the global length T_local * SP = {x.shape[1]} * {sp.size})"
        raise ValueError(
            f"cu_seqlens must start at 0 and end at T={total}{where}, got {cu_seqlens[0]} .. {cu_seqlens[-1]}"
        )
    if not bool((cu_seqlens[1:] > cu_seqlens[:-1]).all()):
        raise ValueError(f"cu_seqlens must be strictly increasing (no empty documents), got {cu_seqlens.tolist()}")


def num_sequences(x: torch.Tensor, cu_seqlens: torch.Tensor | None) -> int:
    """Rows ``N`` of a state for input ``x`` of shape ``(B, T, ...)``: ``B``, or documents when packed."""
    return x.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1


def sequence_ids(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """``(T,)`` index of the document each packed token belongs to."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=cu_seqlens.device), lengths)


def positions_in_sequence(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """``(T,)`` position of each packed token inside its own document (0 at each start)."""
    ids = sequence_ids(cu_seqlens)
    return torch.arange(ids.numel(), device=cu_seqlens.device) - cu_seqlens[ids]


def token_positions(
    x_BT: torch.Tensor, cu_seqlens: torch.Tensor | None, offset_N: torch.Tensor | None = None
) -> torch.Tensor:
    """``(B, T)`` int64 positions: ``offset_N[n] + t``, restarting at each packed document.

    ``offset_N`` (one entry per sequence/document) continues positions after an earlier segment.
    Under sequence parallelism: this rank's global positions (``cu_seqlens`` global, no offset).
    """
    sp = active_sequence_parallel()
    if sp is not None:
        if offset_N is not None:
            raise ValueError("token_positions: position offsets (a decoding state) are not supported under "
                             "sequence parallelism; run decoding without a SequenceParallelContext")
        return global_positions(x_BT, cu_seqlens, sp)
    B, T = x_BT.shape[:2]
    if cu_seqlens is None:
        pos = torch.arange(T, device=x_BT.device).expand(B, T)
        return pos if offset_N is None else pos + offset_N.unsqueeze(1)
    pos = positions_in_sequence(cu_seqlens)
    if offset_N is not None:
        pos = pos + offset_N[sequence_ids(cu_seqlens)]
    return pos.unsqueeze(0)


def sequence_lengths(x: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """``(N,)`` int64 token count of each sequence (``T`` for every row when not packed)."""
    if cu_seqlens is None:
        return torch.full((x.shape[0],), x.shape[1], dtype=torch.long, device=x.device)
    return cu_seqlens[1:] - cu_seqlens[:-1]


def token_shift(
    x_BTD: torch.Tensor, last_ND: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Previous token of every position, ``x_{t-1}`` (``last_ND`` or zeros at a document start).

    Returns ``(x_prev_BTD, new_last_ND)`` where ``new_last_ND`` is each sequence's final token.
    Under ``cu_seqlens`` (B == 1) rows of ``last_ND`` are documents. Under sequence parallelism the
    first token reads the previous rank's last one (``last_ND`` must be None, the returned last
    tokens are this rank's).
    """
    check_varlen(x_BTD, cu_seqlens)
    sp = active_sequence_parallel()
    if sp is not None:
        last_ND, cu_seqlens = halo_cache(x_BTD, 1, last_ND, cu_seqlens, "token_shift")
        last_ND = last_ND[:, 0]
    N = num_sequences(x_BTD, cu_seqlens)
    if last_ND is None:
        last_ND = x_BTD.new_zeros(N, x_BTD.shape[-1])
    if cu_seqlens is None:
        x_prev = torch.cat([last_ND.unsqueeze(1).to(x_BTD.dtype), x_BTD[:, :-1]], dim=1)
        return x_prev, x_BTD[:, -1]
    x_TD = x_BTD[0]
    starts = cu_seqlens[:-1].long()  # index_copy takes int64 offsets only
    x_prev = torch.cat([x_TD.new_zeros(1, x_TD.shape[-1]), x_TD[:-1]], dim=0)
    x_prev = x_prev.index_copy(0, starts, last_ND.to(x_TD.dtype))
    return x_prev.unsqueeze(0), x_TD[cu_seqlens[1:] - 1]


def halo_cache(x_BTC: torch.Tensor, width: int, cache: torch.Tensor | None, cu_seqlens: torch.Tensor | None,
               caller: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Under SP: the previous rank's last ``width`` tokens as a per-row cache ``(N_local, width, C)``
    and the local offsets. Rows: batch rows, or local documents (only the first one continues from
    the previous rank; the others start from zeros)."""
    sp = active_sequence_parallel()
    if cache is not None:
        raise ValueError(f"{caller}: a decoding cache/state is not supported under sequence parallelism; "
                         "run decoding without a SequenceParallelContext")
    halo_BWC = previous_tokens(x_BTC, width, cu_seqlens, sp)
    local_cu = local_offsets(cu_seqlens, sp, x_BTC.shape[1])
    if local_cu is not None and local_cu.numel() > 2:
        halo_BWC = torch.cat([halo_BWC, halo_BWC.new_zeros(local_cu.numel() - 2, *halo_BWC.shape[1:])])
    return halo_BWC, local_cu


# ---------------------------------------------------------------------- positions and norms
def apply_rope(x_BTHd: torch.Tensor, pos_BT: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding (rotate-half layout) of ``(B, T, H, d)`` at integer positions ``(B, T)``."""
    d = x_BTHd.shape[-1]
    if d % 2:
        raise ValueError(f"RoPE needs an even head dim, got {d}")
    inv_freq = theta ** (-torch.arange(0, d, 2, device=x_BTHd.device, dtype=torch.float32) / d)
    angle = pos_BT.to(torch.float32).unsqueeze(-1) * inv_freq  # (B, T, d/2)
    cos, sin = angle.cos().unsqueeze(2), angle.sin().unsqueeze(2)
    x1, x2 = x_BTHd.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x_BTHd.dtype)


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Unit L2 norm over the last dim."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


# ---------------------------------------------------------------------- mixer plumbing
def core_backend(backend: str, x_BTD: torch.Tensor, state: dict | None) -> str:
    """The kernel backend for one call: the naive recurrence for one-token decoding steps."""
    return "naive" if state is not None and x_BTD.shape[1] == 1 else backend


class ConvProjection(nn.Module):
    """A projection followed by an optional :class:`ShortConvolution` whose tail lives in the state.

    ``proj`` maps ``(B, T, D) -> (B, T, C)``; ``conv_size == 0`` disables the conv.  The conv tail is
    read from ``state[key]`` and written to ``new_state[key]`` (``(N, C, conv_size - 1)``).
    """

    def __init__(self, proj: nn.Module, channels: int, conv_size: int, activation: str | None = "silu"):
        super().__init__()
        from linear_moe.model.mixers.short_conv import ShortConvolution

        self.proj = proj
        self.conv = ShortConvolution(channels, conv_size, activation) if conv_size > 0 else None

    def forward(self, x_BTD, key: str, state: dict | None, new_state: dict | None, cu_seqlens=None):
        y_BTC = self.proj(x_BTD)
        if self.conv is None:
            return y_BTC
        cache = None if state is None else state.get(key)
        y_BTC, tail = self.conv(y_BTC, cache, cu_seqlens, output_cache=new_state is not None)
        if new_state is not None:
            new_state[key] = tail
        return y_BTC


def conv_qkv_projections(config, linears, num_local_heads: int) -> tuple[ConvProjection, ConvProjection, ConvProjection]:
    """The usual q, k, v: column projections to ``H*K``, ``H*K``, ``H*V`` (whole heads per TP rank),
    each followed by a short SiLU conv of ``config.conv_size``. Assign them to ``q_proj``/``k_proj``/``v_proj``."""
    D, H, K, V, W = config.hidden_size, config.num_heads, config.key_dim, config.value_dim, config.conv_size
    return (ConvProjection(linears.column(D, H * K), num_local_heads * K, W),
            ConvProjection(linears.column(D, H * K), num_local_heads * K, W),
            ConvProjection(linears.column(D, H * V), num_local_heads * V, W))


def conv_qkv_heads(mixer, x_BTD, state, new_state, cu_seqlens):
    """Run ``mixer.q_proj/k_proj/v_proj`` (their conv tails under ``conv_q/k/v`` in the state) and split
    heads: ``q, k (B, T, Hl, K)``, ``v (B, T, Hl, V)``."""
    H = mixer.num_heads
    return tuple(split_heads(getattr(mixer, f"{name}_proj")(x_BTD, f"conv_{name}", state, new_state, cu_seqlens), H)
                 for name in ("q", "k", "v"))
