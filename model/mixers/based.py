"""Based (Arora et al., 2024): linear attention with a 2nd-order Taylor feature map of a small
feature width (``feature_dim = min(16, key_dim)``) and the linear-attention normaliser.

    o_t = sum_i phi(q_t).phi(k_i) v_i / sum_i phi(q_t).phi(k_i),   phi(q).phi(k) ~ exp(q.k / sqrt(d))

State: ``"S"`` (N, H, K', V + 1) fp32, K' = 1 + d + d(d+1)/2; the last column holds the key sum.
"""
from __future__ import annotations

from linear_moe.model.mixers.base import SINGLE_DEVICE, Linears, Mixer, MixerState, register_mixer
from linear_moe.model.mixers.common import check_varlen, core_backend, merge_heads, split_heads
from linear_moe.model.mixers.feature_maps import Taylor
from linear_moe.model.mixers.linear_attention import normalized_linear_attention


@register_mixer("based")
class Based(Mixer):
    family = "identity"
    max_feature_dim = 16
    feature_map_cls = Taylor

    def __init__(self, config, layer_idx: int = 0, linears: Linears = SINGLE_DEVICE):
        super().__init__(config, layer_idx, linears)
        D, H, V = config.hidden_size, config.num_heads, config.value_dim
        self.num_heads = linears.local_heads(H)
        self.feature_dim = min(self.max_feature_dim, config.key_dim)
        self.q_proj = linears.column(D, H * self.feature_dim)
        self.k_proj = linears.column(D, H * self.feature_dim)
        self.v_proj = linears.column(D, H * V)
        self.feature_map = self.feature_map_cls(self.feature_dim, self.num_heads)
        self.o_proj = linears.row(H * V, D)

    def forward(self, x_BTD, state: MixerState | None = None, cu_seqlens=None, output_state: bool = False):
        check_varlen(x_BTD, cu_seqlens)
        H = self.num_heads
        q = self.feature_map(split_heads(self.q_proj(x_BTD), H))
        k = self.feature_map(split_heads(self.k_proj(x_BTD), H))
        v = split_heads(self.v_proj(x_BTD), H)
        o, S = normalized_linear_attention(
            q, k, v, scale=1.0, initial_state=None if state is None else state.get("S"),
            output_final_state=output_state, cu_seqlens=cu_seqlens,
            backend=core_backend(self.backend, x_BTD, state), chunk_size=self.config.chunk_size,
        )
        return self.o_proj(merge_heads(o)), ({"S": S} if output_state else None)


