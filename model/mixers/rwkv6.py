"""RWKV6 "Finch" time mixing (Peng et al., 2024): token shift with data-dependent interpolation,
a LoRA data-dependent diagonal decay and the current-token bonus ``u``.

    d_t = x_{t-1} - x_t;  m_c = B_c tanh(A (x_t + mu * d_t)) + b_c  for c in (r, w, k, v, g)
    r, k, v, g = W_c (x_t + m_c * d_t);   w_t = -exp(W_up tanh(W_down (x_t + m_w * d_t)))
    S_t = diag(exp(w_t)) S_{t-1} + k_t^T v_t;   o_t = r_t (S_{t-1} + diag(u) k_t^T v_t)
    y_t = W_o (groupnorm(o_t) * silu(g_t))     (group norm = per-head layer norm with affine)

State: ``"S"`` (N, H, K, V) fp32 and ``"shift"`` (N, D), the last input token of each sequence.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from linear_moe.model.mixers.base import SINGLE_DEVICE, Linears, Mixer, MixerState, register_mixer
from linear_moe.model.mixers.common import check_varlen, core_backend, merge_heads, split_heads, token_shift
from linear_moe.model.parallel import current_sequence_parallel

MIX_NAMES = ("r", "w", "k", "v", "g")


class PerHeadLayerNorm(nn.Module):
    """Layer norm over the last dim of ``(..., H, V)`` with a separate affine per head and channel."""

    def __init__(self, num_heads: int, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_heads, dim))
        self.bias = nn.Parameter(torch.zeros(num_heads, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.float(), x.shape[-1:], eps=self.eps) * self.weight + self.bias
        return y.to(x.dtype)


@register_mixer("rwkv6")
class RWKV6(Mixer):
    family = "diagonal_decay"
    mix_low_rank_dim = 32
    decay_low_rank_dim = 64

    def __init__(self, config, layer_idx: int = 0, linears: Linears = SINGLE_DEVICE):
        super().__init__(config, layer_idx, linears)
        D, H, K, V = config.hidden_size, config.num_heads, config.key_dim, config.value_dim
        self.num_heads = Hl = linears.local_heads(H)
        r = self.mix_low_rank_dim
        self.mu_x = nn.Parameter(torch.zeros(D))
        self.mix_down = linears.replicated(D, len(MIX_NAMES) * r)
        self.mix_up = nn.Parameter(torch.empty(len(MIX_NAMES), r, D).uniform_(-1 / math.sqrt(r), 1 / math.sqrt(r)))
        self.mix_bias = nn.Parameter(torch.zeros(len(MIX_NAMES), D))
        self.r_proj = linears.column(D, H * K)
        self.k_proj = linears.column(D, H * K)
        self.v_proj = linears.column(D, H * V)
        self.g_proj = linears.column(D, H * V)
        self.w_down = linears.replicated(D, self.decay_low_rank_dim)
        self.w_up = linears.column(self.decay_low_rank_dim, H * K, bias=True)
        ramp = torch.linspace(0.5, 0.0, K)  # bonus: larger for the first key channels, as RWKV's init
        self.bonus = nn.Parameter(ramp.expand(Hl, K).clone())
        self.norm = PerHeadLayerNorm(Hl, V, config.norm_eps)
        self.o_proj = linears.row(H * V, D)

    def forward(self, x_BTD, state: MixerState | None = None, cu_seqlens=None, output_state: bool = False):
        check_varlen(x_BTD, cu_seqlens)
        H = self.num_heads
        x_prev, last_ND = token_shift(x_BTD, None if state is None else state.get("shift"), cu_seqlens)
        delta = x_prev - x_BTD
        low = torch.tanh(self.mix_down(x_BTD + delta * self.mu_x)).unflatten(-1, (len(MIX_NAMES), -1))
        mix = torch.einsum("btcr,crd->btcd", low, self.mix_up) + self.mix_bias  # (B, T, 5, D)
        xs = dict(zip(MIX_NAMES, (x_BTD + delta * m for m in mix.unbind(2))))
        r = split_heads(self.r_proj(xs["r"]), H)
        k = split_heads(self.k_proj(xs["k"]), H)
        v = split_heads(self.v_proj(xs["v"]), H)
        w = -torch.exp(split_heads(self.w_up(torch.tanh(self.w_down(xs["w"]))), H).float())
        o, S = current_sequence_parallel().gla(
            r, k, v, w, u=self.bonus, scale=1.0, initial_state=None if state is None else state.get("S"),
            output_final_state=output_state, cu_seqlens=cu_seqlens,
            backend=core_backend(self.backend, x_BTD, state), chunk_size=self.config.chunk_size,
        )
        o = self.norm(o) * F.silu(split_heads(self.g_proj(xs["g"]), H))
        return self.o_proj(merge_heads(o)), ({"S": S, "shift": last_ND} if output_state else None)
