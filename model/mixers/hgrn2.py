"""HGRN2 (Qin et al., 2024): a GLA recurrence whose key is the input gate ``1 - forget``.

    f_t = sigmoid(W_f x_t)   g_t = log f_t   k_t = 1 - f_t   q_t = silu(W_q x_t)   v_t = W_i x_t
    S_t = diag(f_t) S_{t-1} + k_t^T v_t     o_t = K^-1/2 q_t S_t     y_t = W_o rmsnorm(o_t)

The RMSNorm is per head (fla normalises the whole width) so tensor parallelism needs no reduction;
the lower bound on forget gates across layers (a model-level option in fla) is not used.
State: ``"S"`` (N, H, K, V) fp32 and the conv tails ``"conv_q"``, ``"conv_f"``, ``"conv_i"``.
"""
from __future__ import annotations

import torch.nn.functional as F

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


@register_mixer("hgrn2")
class HGRN2(Mixer):
    family = "diagonal_decay"

    def __init__(self, config, layer_idx: int = 0, linears: Linears = SINGLE_DEVICE):
        super().__init__(config, layer_idx, linears)
        D, H, K, V = config.hidden_size, config.num_heads, config.key_dim, config.value_dim
        self.num_heads = linears.local_heads(H)
        Hl, W = self.num_heads, config.conv_size
        self.q_proj = ConvProjection(linears.column(D, H * K), Hl * K, W, activation=None)
        self.f_proj = ConvProjection(linears.column(D, H * K), Hl * K, W, activation=None)
        self.i_proj = ConvProjection(linears.column(D, H * V), Hl * V, W, activation=None)
        self.norm = GatedRMSNorm(V, config.norm_eps)
        self.o_proj = linears.row(H * V, D)

    def forward(self, x_BTD, state: MixerState | None = None, cu_seqlens=None, output_state: bool = False):
        check_varlen(x_BTD, cu_seqlens)
        new_state: MixerState | None = {} if output_state else None
        H = self.num_heads
        q = F.silu(split_heads(self.q_proj(x_BTD, "conv_q", state, new_state, cu_seqlens), H))
        g = F.logsigmoid(split_heads(self.f_proj(x_BTD, "conv_f", state, new_state, cu_seqlens), H).float())
        k = (1 - g.exp()).to(q.dtype)
        v = split_heads(self.i_proj(x_BTD, "conv_i", state, new_state, cu_seqlens), H)
        o, S = current_sequence_parallel().gla(
            q, k, v, g, initial_state=None if state is None else state.get("S"), output_final_state=output_state,
            cu_seqlens=cu_seqlens, backend=core_backend(self.backend, x_BTD, state), chunk_size=self.config.chunk_size,
        )
        if new_state is not None:
            new_state["S"] = S
        return self.o_proj(merge_heads(self.norm(o))), new_state
