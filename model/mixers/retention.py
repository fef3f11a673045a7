"""Multi-scale retention (RetNet, Sun et al., 2023): a fixed scalar decay per head.

    gamma_h = 1 - 2^(-5-h)     S_t = gamma_h S_{t-1} + k_t^T v_t     o_t = K^-1/2 q_t S_t
    q, k carry rotary position embeddings; y_t = W_o (rmsnorm(o_t) * silu(W_g x_t))

``h`` is the global head index: under tensor parallelism ``linears.tp_rank`` (0 when absent)
selects this rank's slice.  State: ``"S"`` (N, H, K, V) fp32 and ``"offset"`` (N,) int64, the
number of tokens already seen (rotary positions continue from it).
"""
from __future__ import annotations

import math

import torch

from linear_moe.model.mixers.base import SINGLE_DEVICE, Linears, Mixer, MixerState, register_mixer
from linear_moe.model.mixers.common import (
    GatedRMSNorm,
    apply_rope,
    check_varlen,
    core_backend,
    merge_heads,
    sequence_lengths,
    split_heads,
    token_positions,
)
from linear_moe.model.parallel import current_sequence_parallel


def local_head_slice(linears: Linears, num_local_heads: int) -> slice:
    """Global head indices held by this tensor-parallel rank."""
    start = getattr(linears, "tp_rank", 0) * num_local_heads
    return slice(start, start + num_local_heads)


@register_mixer("retention")
class MultiScaleRetention(Mixer):
    family = "fixed_decay"

    def __init__(self, config, layer_idx: int = 0, linears: Linears = SINGLE_DEVICE):
        super().__init__(config, layer_idx, linears)
        D, H, K, V = config.hidden_size, config.num_heads, config.key_dim, config.value_dim
        self.num_heads = linears.local_heads(H)
        self.q_proj = linears.column(D, H * K)
        self.k_proj = linears.column(D, H * K)
        self.v_proj = linears.column(D, H * V)
        self.g_proj = linears.column(D, H * V)
        self.norm = GatedRMSNorm(V, config.norm_eps)
        self.o_proj = linears.row(H * V, D)
        # a constant of the architecture, not state: plain floats stay out of state dicts and survive
        # meta-device construction (transformers' from_pretrained)
        heads = range(H)[local_head_slice(linears, self.num_heads)]
        self.log_gamma_H: tuple[float, ...] = tuple(math.log1p(-(2.0 ** (-5.0 - h))) for h in heads)

    @classmethod
    def validate_config(cls, config) -> None:
        if config.key_dim % 2:
            raise ValueError(f"ModelConfig.expand_k: retention applies RoPE, so key_dim={config.key_dim} must be even")

    def forward(self, x_BTD, state: MixerState | None = None, cu_seqlens=None, output_state: bool = False):
        check_varlen(x_BTD, cu_seqlens)
        H = self.num_heads
        offset_N = None if state is None else state.get("offset")
        pos_BT = token_positions(x_BTD, cu_seqlens, offset_N)
        theta = self.config.rope_theta
        q = apply_rope(split_heads(self.q_proj(x_BTD), H), pos_BT, theta)
        k = apply_rope(split_heads(self.k_proj(x_BTD), H), pos_BT, theta)
        v = split_heads(self.v_proj(x_BTD), H)
        g = torch.tensor(self.log_gamma_H, device=x_BTD.device).expand(*x_BTD.shape[:2], H)
        o, S = current_sequence_parallel().gla(
            q, k, v, g, initial_state=None if state is None else state.get("S"), output_final_state=output_state,
            cu_seqlens=cu_seqlens, backend=core_backend(self.backend, x_BTD, state), chunk_size=self.config.chunk_size,
        )
        o = self.norm(o, split_heads(self.g_proj(x_BTD), H))
        new_state = None
        if output_state:
            seen_N = sequence_lengths(x_BTD, cu_seqlens)
            new_state = {"S": S, "offset": seen_N if offset_N is None else offset_N + seen_N}
        return self.o_proj(merge_heads(o)), new_state
