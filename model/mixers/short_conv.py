"""Causal depthwise short convolution (the q/k/v conv of GLA-family layers and Mamba2).

``y_t = act(sum_{j<W} w[:, W-1-j] * x_{t-j})`` per channel, where inputs before a document start
come from the cache (the previous ``W-1`` inputs, oldest first) or are zero.  Packed documents are
handled by placing each document's cache just before it in one buffer, so a single ``conv1d``
serves batched, packed and one-token decoding calls alike.  Under sequence parallelism the cache
of each rank's first sequence is the previous rank's tail (the halo, ``common.halo_cache``).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from linear_moe.model.mixers.common import check_varlen, halo_cache, num_sequences
from linear_moe.model.parallel.halo import active_sequence_parallel

ACTIVATIONS: dict[str | None, Callable[[torch.Tensor], torch.Tensor]] = {
    None: lambda x: x,
    "identity": lambda x: x,
    "silu": F.silu,
    "swish": F.silu,
}


class ShortConvolution(nn.Module):
    """Causal depthwise conv1d over ``(B, T, C)`` with a ``(N, C, kernel_size - 1)`` cache."""

    def __init__(self, channels: int, kernel_size: int, activation: str | None = "silu", bias: bool = False):
        super().__init__()
        if kernel_size < 1:
            raise ValueError(f"ShortConvolution: kernel_size must be >= 1, got {kernel_size}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"ShortConvolution: activation {activation!r} not in {sorted(map(str, ACTIVATIONS))}")
        self.channels = channels
        self.kernel_size = kernel_size
        self.activation = activation
        bound = 1.0 / math.sqrt(kernel_size)  # nn.Conv1d's default for a depthwise kernel
        self.weight = nn.Parameter(torch.empty(channels, kernel_size).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None

    def extra_repr(self) -> str:
        return f"{self.channels}, kernel_size={self.kernel_size}, activation={self.activation}"

    def forward(
        self,
        x_BTC: torch.Tensor,
        cache: torch.Tensor | None = None,
        cu_seqlens: torch.LongTensor | None = None,
        output_cache: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return ``(y_BTC, cache_NCW)``; the cache (last ``W-1`` inputs per sequence) only if asked."""
        check_varlen(x_BTC, cu_seqlens)
        B, T, C = x_BTC.shape
        W1 = self.kernel_size - 1
        if active_sequence_parallel() is not None:
            if output_cache:
                raise ValueError("ShortConvolution: output_cache (a decoding state) is not supported under "
                                 "sequence parallelism; run decoding without a SequenceParallelContext")
            halo_NWC, cu_seqlens = halo_cache(x_BTC, W1, cache, cu_seqlens, "ShortConvolution")
            cache = halo_NWC.transpose(1, 2)
        N = num_sequences(x_BTC, cu_seqlens)
        if cache is None:
            cache = x_BTC.new_zeros(N, C, W1)
        elif cache.shape != (N, C, W1):
            raise ValueError(f"ShortConvolution: cache must be (N={N}, C={C}, {W1}), got {tuple(cache.shape)}")
        cache_NWC = cache.transpose(1, 2).to(x_BTC.dtype)
        if cu_seqlens is None:
            buf_BLC = torch.cat([cache_NWC, x_BTC], dim=1)  # L = W1 + T
            token_idx = None
        else:
            buf_BLC, token_idx, tail_idx_NW = _pack_with_caches(x_BTC[0], cache_NWC, cu_seqlens)
        y = F.conv1d(buf_BLC.transpose(1, 2), self.weight.unsqueeze(1), self.bias, groups=C)  # (B, C, L - W1)
        y_BTC = y.transpose(1, 2)
        if token_idx is not None:
            y_BTC = y_BTC[:, token_idx - W1]
        y_BTC = ACTIVATIONS[self.activation](y_BTC)
        if not output_cache:
            return y_BTC, None
        if cu_seqlens is None:
            new_cache = buf_BLC[:, buf_BLC.shape[1] - W1:]
        else:
            new_cache = buf_BLC[0][tail_idx_NW]
        return y_BTC, new_cache.transpose(1, 2).contiguous()

    def step(self, x_BC: torch.Tensor, cache_NCW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One decoding step: ``(B, C)`` input and cache -> ``(B, C)`` output and the rolled cache."""
        y, cache = self.forward(x_BC.unsqueeze(1), cache_NCW, output_cache=True)
        return y.squeeze(1), cache


def _pack_with_caches(x_TC: torch.Tensor, cache_NWC: torch.Tensor, cu_seqlens: torch.Tensor):
    """Lay out ``[cache_0, doc_0, cache_1, doc_1, ...]`` in one ``(1, T + N*W1, C)`` buffer.

    Returns the buffer, the buffer index of every token ``(T,)`` and of each document's last
    ``W1`` inputs ``(N, W1)``.
    """
    N, W1, C = cache_NWC.shape
    T = x_TC.shape[0]
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    doc = torch.repeat_interleave(torch.arange(N, device=x_TC.device), lengths)
    token_idx = torch.arange(T, device=x_TC.device) + W1 * (doc + 1)
    cache_idx = (cu_seqlens[:-1] + W1 * torch.arange(N, device=x_TC.device)).unsqueeze(1) + torch.arange(
        W1, device=x_TC.device
    )  # (N, W1)
    buf = x_TC.new_zeros(T + N * W1, C)
    buf = buf.index_copy(0, token_idx, x_TC).index_copy(0, cache_idx.reshape(-1), cache_NWC.reshape(-1, C))
    ends = cu_seqlens[1:] + W1 * torch.arange(1, N + 1, device=x_TC.device)  # exclusive buffer end per doc
    tail_idx = ends.unsqueeze(1) - W1 + torch.arange(W1, device=x_TC.device)
    return buf.unsqueeze(0), token_idx, tail_idx
