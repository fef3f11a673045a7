"""DeltaNet (Yang et al., 2024) and Gated DeltaNet (Yang et al., 2025) around ``kernels.delta_rule``.

    q, k, v = silu(conv(W x)),  q, k L2-normalised per head,  beta_t = sigmoid(W_b x_t)
    S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T        o_t = K^-1/2 q_t^T S_t
    DeltaNet:       alpha_t = 1,   y_t = W_o rmsnorm(o_t)  (optionally * silu(W_g x_t))
    Gated DeltaNet: log alpha_t = -exp(A_log) * softplus(W_a x_t + dt_bias),  y_t = W_o (rmsnorm(o_t) * silu(W_g x_t))

State: ``"S"`` (N, H, K, V) fp32 and the conv tails ``"conv_q"``, ``"conv_k"``, ``"conv_v"``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from linear_moe.model.mixers.base import SINGLE_DEVICE, Linears, Mixer, MixerState, register_mixer
from linear_moe.model.mixers.common import (
    conv_qkv_projections,
    GatedRMSNorm,
    check_varlen,
    core_backend,
    l2_normalize,
    merge_heads,
    split_heads,
)
from linear_moe.model.parallel import current_sequence_parallel


@register_mixer("deltanet")
class DeltaNet(Mixer):
    family = "delta_rule"
    #: multiply the normed output by silu(W_g x) (fla's ``use_gate``); Gated DeltaNet always does
    use_output_gate = False

    def __init__(self, config, layer_idx: int = 0, linears: Linears = SINGLE_DEVICE):
        super().__init__(config, layer_idx, linears)
        D, H, V = config.hidden_size, config.num_heads, config.value_dim
        self.num_heads = linears.local_heads(H)
        self.q_proj, self.k_proj, self.v_proj = conv_qkv_projections(config, linears, self.num_heads)
        self.b_proj = linears.column(D, H)
        self.g_proj = linears.column(D, H * V) if self.use_output_gate else None
        self.norm = GatedRMSNorm(V, config.norm_eps)
        self.o_proj = linears.row(H * V, D)

    def log_decay(self, x_BTD: torch.Tensor) -> torch.Tensor | None:
        """(B, T, H) log-decay of the state, or None for no decay."""
        return None

    def forward(self, x_BTD, state: MixerState | None = None, cu_seqlens=None, output_state: bool = False):
        check_varlen(x_BTD, cu_seqlens)
        new_state: MixerState | None = {} if output_state else None
        H = self.num_heads
        # without the conv, silu is applied directly (the conv applies it when present)
        act = F.silu if self.config.conv_size == 0 else (lambda t: t)
        q = l2_normalize(split_heads(act(self.q_proj(x_BTD, "conv_q", state, new_state, cu_seqlens)), H))
        k = l2_normalize(split_heads(act(self.k_proj(x_BTD, "conv_k", state, new_state, cu_seqlens)), H))
        v = split_heads(act(self.v_proj(x_BTD, "conv_v", state, new_state, cu_seqlens)), H)
        beta = torch.sigmoid(self.b_proj(x_BTD).float())
        o, S = current_sequence_parallel().delta_rule(
            q, k, v, beta, self.log_decay(x_BTD), initial_state=None if state is None else state.get("S"),
            output_final_state=output_state, cu_seqlens=cu_seqlens,
            backend=core_backend(self.backend, x_BTD, state), chunk_size=self.config.chunk_size,
        )
        gate = None if self.g_proj is None else split_heads(self.g_proj(x_BTD), H)
        o = self.norm(o, gate)
        if new_state is not None:
            new_state["S"] = S
        return self.o_proj(merge_heads(o)), new_state


@register_mixer("gated_deltanet")
class GatedDeltaNet(DeltaNet):
    """DeltaNet with a Mamba2-style data-dependent scalar decay per head and a gated output norm."""

    use_output_gate = True

    def __init__(self, config, layer_idx: int = 0, linears: Linears = SINGLE_DEVICE):
        super().__init__(config, layer_idx, linears)
        D, H = config.hidden_size, config.num_heads
        Hl = self.num_heads
        self.a_proj = linears.column(D, H)
        # A ~ U(0, 16) per head; dt ~ logU(1e-3, 1e-1) stored as softplus^-1(dt)
        self.A_log = nn.Parameter(torch.empty(Hl).uniform_(0, 16).clamp_min(1e-4).log())
        dt = torch.exp(torch.rand(Hl) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp_min(1e-4)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))

    def log_decay(self, x_BTD: torch.Tensor) -> torch.Tensor:
        return -self.A_log.float().exp() * F.softplus(self.a_proj(x_BTD).float() + self.dt_bias.float())
