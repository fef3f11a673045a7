"""Gated Slot Attention (Zhang et al., 2024): two GLA passes through ``M = config.num_slots`` slots.

    f_t = logsigmoid(W_f x_t) / 8  (per head and slot),  s_t = 1 - exp(f_t)
    q, k, v = silu(...)   (silu after the optional short conv)
    pass 1 (keys -> slots):   H^k_t = H^k_{t-1} diag(exp(f_t)) + k_t^T s_t   (K x M),  a_t = softmax(q_t H^k_t)
    pass 2 (slots -> values): H^v_t = diag(exp(f_t)) H^v_{t-1} + s_t^T v_t   (M x V),  o_t = a_t H^v_t
    y_t = W_o rmsnorm(silu(o_t))

Pass 2 is a plain diagonal-decay GLA.  Pass 1 decays along its *value* axis (the slots); it runs as
a scalar-decay GLA with one head per (head, slot) pair and a width-1 value, which costs M times the
q/k traffic of one pass.  State: ``"S_k"`` (N, H, K, M) and ``"S"`` (N, H, M, V), fp32, plus the conv
tails ``"conv_q"``, ``"conv_k"``, ``"conv_v"``.
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


@register_mixer("gsa")
class GatedSlotAttention(Mixer):
    family = "diagonal_decay"
    gate_logit_normalizer = 8

    def __init__(self, config, layer_idx: int = 0, linears: Linears = SINGLE_DEVICE):
        super().__init__(config, layer_idx, linears)
        D, H, V, M = config.hidden_size, config.num_heads, config.value_dim, config.num_slots
        self.num_heads = linears.local_heads(H)
        self.q_proj, self.k_proj, self.v_proj = conv_qkv_projections(config, linears, self.num_heads)
        self.f_proj = linears.column(D, H * M)
        self.norm = GatedRMSNorm(V, config.norm_eps)
        self.o_proj = linears.row(H * V, D)

    @classmethod
    def validate_config(cls, config) -> None:
        if config.num_slots <= 0:
            raise ValueError(f"ModelConfig.num_slots: gsa needs a positive number of slots, got {config.num_slots}")

    def forward(self, x_BTD, state: MixerState | None = None, cu_seqlens=None, output_state: bool = False):
        check_varlen(x_BTD, cu_seqlens)
        new_state: MixerState | None = {} if output_state else None
        H = self.num_heads
        q, k, v = conv_qkv_heads(self, x_BTD, state, new_state, cu_seqlens)
        if self.q_proj.conv is None:  # the conv carries the silu; without it apply it here
            q, k = F.silu(q), F.silu(k)
        v = F.silu(v) if self.v_proj.conv is None else v
        f = F.logsigmoid(split_heads(self.f_proj(x_BTD), H).float()) / self.gate_logit_normalizer  # (B, T, H, M)
        s = (1 - f.exp()).to(q.dtype)
        B, T, _, K = q.shape
        M = f.shape[-1]
        N = B if cu_seqlens is None else cu_seqlens.numel() - 1
        common = dict(output_final_state=output_state, cu_seqlens=cu_seqlens,
                      backend=core_backend(self.backend, x_BTD, state), chunk_size=self.config.chunk_size)

        # pass 1: one head per (head, slot): scalar decay f[..., m], value s[..., m]
        S_k = None if state is None else state.get("S_k")
        S1_init = None if S_k is None else S_k.transpose(-1, -2).reshape(N, H * M, K, 1)
        cores = current_sequence_parallel()  # plain kernels, or LASP-2 across SP ranks
        logits, S1 = cores.gla(
            q.unsqueeze(3).expand(B, T, H, M, K).reshape(B, T, H * M, K),
            k.unsqueeze(3).expand(B, T, H, M, K).reshape(B, T, H * M, K),
            s.reshape(B, T, H * M, 1), f.reshape(B, T, H * M), scale=1.0, initial_state=S1_init, **common,
        )
        attn = logits.reshape(B, T, H, M).float().softmax(-1).to(q.dtype)

        # pass 2: slots -> values with the diagonal decay over slots
        o, S2 = cores.gla(attn, s, v, f, scale=1.0, initial_state=None if state is None else state.get("S"), **common)
        y = self.o_proj(merge_heads(self.norm(F.silu(o))))
        if new_state is not None:
            new_state["S_k"] = S1.reshape(N, H, M, K).transpose(-1, -2).contiguous()
            new_state["S"] = S2
        return y, new_state
