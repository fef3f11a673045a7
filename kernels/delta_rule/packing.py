"""Packed variable-length sequences (``cu_seqlens``) <-> a padded batch.

Shared by the delta-rule and DPLR cores.  Zero padding is an identity step for both recurrences
(k = v = beta = g = a = b = gk = 0 leave the state unchanged), so trailing padding keeps every
sequence's final state exact.
"""
from __future__ import annotations

import torch


def split_packed(cu_seqlens: torch.Tensor) -> list[tuple[int, int]]:
    """``[0, 3, 7]`` -> ``[(0, 3), (3, 7)]``."""
    bounds = cu_seqlens.tolist()
    return list(zip(bounds[:-1], bounds[1:]))


def check_cu_seqlens(cu_seqlens: torch.Tensor, batch: int, total: int) -> int:
    """Validate ``cu_seqlens`` for packed input of shape (1, total, ...); return N sequences."""
    if batch != 1:
        raise ValueError(f"cu_seqlens requires batch size 1 (packed input), got B={batch}; flatten the batch first")
    if cu_seqlens.ndim != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with N+1 >= 2 entries, got shape {tuple(cu_seqlens.shape)}")
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != total or any(b > a for a, b in zip(bounds[1:], bounds[:-1])):
        raise ValueError(f"cu_seqlens must rise from 0 to T={total}, got {bounds}")
    return len(bounds) - 1


def pack_index(cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather index (N, L) into the packed axis and its validity mask (N, L), L = longest sequence."""
    starts = cu_seqlens[:-1]
    lengths = cu_seqlens[1:] - starts
    offsets = torch.arange(int(lengths.max()), device=cu_seqlens.device)
    valid_NL = offsets[None] < lengths[:, None]
    index_NL = torch.where(valid_NL, starts[:, None] + offsets[None], 0)
    return index_NL, valid_NL


def packed_to_padded(x_1T: torch.Tensor, index_NL: torch.Tensor, valid_NL: torch.Tensor) -> torch.Tensor:
    """(1, T, ...) -> (N, L, ...) with zeros past each sequence's end."""
    x_NL = x_1T[0][index_NL]
    mask = valid_NL.reshape(valid_NL.shape + (1,) * (x_NL.ndim - 2))
    return torch.where(mask, x_NL, torch.zeros((), dtype=x_NL.dtype, device=x_NL.device))


def padded_to_packed(x_NL: torch.Tensor, valid_NL: torch.Tensor) -> torch.Tensor:
    """(N, L, ...) -> (1, T, ...), keeping the valid positions in order."""
    return x_NL[valid_NL].unsqueeze(0)
