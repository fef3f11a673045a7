"""Gated Linear Attention (Yang et al., 2023): data-dependent diagonal decay from a low-rank gate.

    g_t = logsigmoid(W_up W_down x_t) / 16     S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t
    o_t = K^-1/2 q_t S_t    y_t = W_o (rmsnorm(o_t) * silu(W_g x_t))

State: ``"S"`` (N, H, K, V) fp32 and the conv tails ``"conv_q"``, ``"conv_k"``, ``"conv_v"``.
"""
from __future__ import annotations

import torch.nn.functional as F

from linear_moe.model.mixers.base import SINGLE_DEVICE, Linears, Mixer, MixerState, register_mixer
from linear_moe.model.mixers.common import (
    conv_qkv_heads,
    conv_qkv_projections,
    GatedRMSNorm,
    check_varlen,
    core_backend,
    merge_heads,
    split_heads,
)
from linear_moe.model.parallel import current_sequence_parallel


@register_mixer("gla")
class GatedLinearAttention(Mixer):
    family = "diagonal_decay"
    gate_low_rank_dim = 16
    gate_logit_normalizer = 16

    def __init__(self, config, layer_idx: int = 0, linears: Linears = SINGLE_DEVICE):
        super().__init__(config, layer_idx, linears)
        D, H, K, V = config.hidden_size, config.num_heads, config.key_dim, config.value_dim
        self.num_heads = linears.local_heads(H)
        self.q_proj, self.k_proj, self.v_proj = conv_qkv_projections(config, linears, self.num_heads)
        self.gk_down = linears.replicated(D, self.gate_low_rank_dim)
        self.gk_up = linears.column(self.gate_low_rank_dim, H * K, bias=True)
        self.g_proj = linears.column(D, H * V)
        self.norm = GatedRMSNorm(V, config.norm_eps)
        self.o_proj = linears.row(H * V, D)

    def forward(self, x_BTD, state: MixerState | None = None, cu_seqlens=None, output_state: bool = False):
        check_varlen(x_BTD, cu_seqlens)
        new_state: MixerState | None = {} if output_state else None
        H = self.num_heads
        q, k, v = conv_qkv_heads(self, x_BTD, state, new_state, cu_seqlens)
        g = F.logsigmoid(split_heads(self.gk_up(self.gk_down(x_BTD)), H).float()) / self.gate_logit_normalizer
        o, S = current_sequence_parallel().gla(
            q, k, v, g, initial_state=None if state is None else state.get("S"), output_final_state=output_state,
            cu_seqlens=cu_seqlens, backend=core_backend(self.backend, x_BTD, state), chunk_size=self.config.chunk_size,
        )
        o = self.norm(o, split_heads(self.g_proj(x_BTD), H))
        if new_state is not None:
            new_state["S"] = S
        return self.o_proj(merge_heads(o)), new_state
