"""Mamba2 (SSD, Dao & Gu, 2024) as a scalar-decay linear attention.

    x, B, C = silu(conv(W_x u)), silu(conv(W_B u)), silu(conv(W_C u))   (B, C shared across heads)
    dt = softplus(W_dt u + dt_bias);  a_t = exp(-exp(A_log) * dt)   (scalar per head)
    S_t = a_t S_{t-1} + B_t^T (dt_t x_t)     y_t = C_t S_t + D x_t     (S: state_size x head width)
    out = W_o rmsnorm(y * silu(z))     (norm after the gate, per head, as Mamba2's norm_before_gate=False)

Head width P = ``config.value_dim``; state width N = ``config.state_size``; one B/C group.
State: ``"S"`` (N_seq, H, state_size, P) fp32 and the conv tails ``"conv_x"``, ``"conv_B"``, ``"conv_C"``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from linear_moe.model.mixers.base import SINGLE_DEVICE, Linears, Mixer, MixerState, register_mixer
from linear_moe.model.mixers.common import (
    ConvProjection,
    GatedRMSNorm,
    check_varlen,
    core_backend,
    merge_heads,
    split_heads,
)
from linear_moe.model.parallel import current_sequence_parallel


@register_mixer("mamba2")
class Mamba2(Mixer):
    family = "scalar_decay"
    dt_min, dt_max, dt_floor = 1e-3, 0.1, 1e-4
    A_init_range = (1.0, 16.0)

    def __init__(self, config, layer_idx: int = 0, linears: Linears = SINGLE_DEVICE):
        super().__init__(config, layer_idx, linears)
        D, H, P, N = config.hidden_size, config.num_heads, config.value_dim, config.state_size
        self.num_heads = Hl = linears.local_heads(H)
        W = config.conv_size
        self.z_proj = linears.column(D, H * P)
        self.x_proj = ConvProjection(linears.column(D, H * P), Hl * P, W)
        self.B_proj = ConvProjection(linears.replicated(D, N), N, W)
        self.C_proj = ConvProjection(linears.replicated(D, N), N, W)
        self.dt_proj = linears.column(D, H)
        dt = torch.exp(torch.rand(Hl) * (math.log(self.dt_max) - math.log(self.dt_min)) + math.log(self.dt_min))
        dt = dt.clamp(min=self.dt_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.A_log = nn.Parameter(torch.empty(Hl).uniform_(*self.A_init_range).log())
        self.D = nn.Parameter(torch.ones(Hl))
        self.norm = GatedRMSNorm(P, config.norm_eps)
        self.o_proj = linears.row(H * P, D)

    @classmethod
    def validate_config(cls, config) -> None:
        if config.state_size <= 0:
            raise ValueError(
                f"ModelConfig.state_size: mamba2 needs a positive SSM state width, got {config.state_size}"
            )

    def forward(self, x_BTD, state: MixerState | None = None, cu_seqlens=None, output_state: bool = False):
        check_varlen(x_BTD, cu_seqlens)
        new_state: MixerState | None = {} if output_state else None
        H = self.num_heads
        x = split_heads(self.x_proj(x_BTD, "conv_x", state, new_state, cu_seqlens), H)
        B_ = self.B_proj(x_BTD, "conv_B", state, new_state, cu_seqlens)
        C_ = self.C_proj(x_BTD, "conv_C", state, new_state, cu_seqlens)
        dt = F.softplus(self.dt_proj(x_BTD).float() + self.dt_bias)  # (B, T, H)
        g = -torch.exp(self.A_log.float()) * dt
        k = B_.unsqueeze(2).expand(*B_.shape[:2], H, B_.shape[-1])
        q = C_.unsqueeze(2).expand(*C_.shape[:2], H, C_.shape[-1])
        v = x * dt.unsqueeze(-1).to(x.dtype)
        y, S = current_sequence_parallel().gla(
            q, k, v, g, scale=1.0, initial_state=None if state is None else state.get("S"),
            output_final_state=output_state, cu_seqlens=cu_seqlens,
            backend=core_backend(self.backend, x_BTD, state), chunk_size=self.config.chunk_size,
        )
        y = y + x * self.D.unsqueeze(-1).to(x.dtype)
        y = self.norm(y * F.silu(split_heads(self.z_proj(x_BTD), H)))
        if new_state is not None:
            new_state["S"] = S
        return self.o_proj(merge_heads(y)), new_state
