"""Linear attention (Katharopoulos et al., 2020) with a feature map from :mod:`feature_maps`.

    S_t = S_{t-1} + phi(k_t)^T v_t     o_t = phi(q_t) S_t * scale     (optionally / phi(q_t) . z_t)
    y_t = W_o rmsnorm(o_t)   (the output RMSNorm per head is optional)

``normalize=True`` divides by the running key sum ``z_t = sum_i phi(k_i)``.  It is kept inside the
matrix state by appending a column of ones to ``v``: then ``"S"`` is ``(N, H, K', V + 1)`` with ``z`` as
its last column.  State: ``"S"`` (N, H, K', V) fp32, K' the feature width.
"""
from __future__ import annotations

import torch
from torch import nn

from linear_moe.model.mixers.base import SINGLE_DEVICE, Linears, Mixer, MixerState, register_mixer
from linear_moe.model.mixers.common import GatedRMSNorm, check_varlen, core_backend, merge_heads, split_heads
from linear_moe.model.mixers.feature_maps import FEATURE_MAPS, build_feature_map
from linear_moe.model.parallel import current_sequence_parallel


def normalized_linear_attention(q, k, v, *, scale=None, eps: float = 1e-5, **gla_kwargs):
    """``(phi(q) S) / (phi(q) z + eps)`` through one ``gla`` call on ``[v, 1]``.

    q, k: (B, T, H, K) features; v: (B, T, H, V).  Returns o (B, T, H, V) and the state
    (N, H, K, V + 1) whose last column is ``z``.  ``scale`` cancels out of the ratio but is passed on.
    """
    v1 = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
    o1, S = current_sequence_parallel().gla(q, k, v1, None, scale=scale, **gla_kwargs)
    return o1[..., :-1] / (o1[..., -1:] + eps), S


@register_mixer("linear_attention")
class LinearAttention(Mixer):
    family = "identity"

    def __init__(self, config, layer_idx: int = 0, linears: Linears = SINGLE_DEVICE,
                 normalize: bool = False, output_norm: bool = True):
        super().__init__(config, layer_idx, linears)
        D, H, K, V = config.hidden_size, config.num_heads, config.key_dim, config.value_dim
        self.num_heads = linears.local_heads(H)
        self.normalize = normalize
        self.q_proj = linears.column(D, H * K)
        self.k_proj = linears.column(D, H * K)
        self.v_proj = linears.column(D, H * V)
        self.q_map = build_feature_map(config.feature_map, K, self.num_heads)
        self.k_map = build_feature_map(config.feature_map, K, self.num_heads)
        self.norm = GatedRMSNorm(V, config.norm_eps) if output_norm else nn.Identity()
        self.o_proj = linears.row(H * V, D)

    @classmethod
    def validate_config(cls, config) -> None:
        if config.feature_map not in FEATURE_MAPS:
            raise ValueError(
                f"ModelConfig.feature_map: unknown feature map {config.feature_map!r} for linear_attention; "
                f"known: {sorted(FEATURE_MAPS)}"
            )

    def forward(self, x_BTD, state: MixerState | None = None, cu_seqlens=None, output_state: bool = False):
        check_varlen(x_BTD, cu_seqlens)
        H = self.num_heads
        q = self.q_map(split_heads(self.q_proj(x_BTD), H))
        k = self.k_map(split_heads(self.k_proj(x_BTD), H))
        v = split_heads(self.v_proj(x_BTD), H)
        kwargs = dict(initial_state=None if state is None else state.get("S"), output_final_state=output_state,
                      cu_seqlens=cu_seqlens, backend=core_backend(self.backend, x_BTD, state),
                      chunk_size=self.config.chunk_size)
        if self.normalize:
            o, S = normalized_linear_attention(q, k, v, **kwargs)
        else:
            o, S = current_sequence_parallel().gla(q, k, v, None, **kwargs)
        y = self.o_proj(merge_heads(self.norm(o)))
        return y, ({"S": S} if output_state else None)
