"""Lightning attention (TransNormerLLM, Qin et al., 2023): a fixed per-head slope decay.

    lambda_h = exp(-s_h),  s_h = 2^(-8(h+1)/H) * (1 - l/(L-1) + 1e-5)  (ALiBi slopes, scaled by layer l of L)
    q, k, v = silu(conv(W x))    S_t = lambda_h S_{t-1} + k_t^T v_t    o_t = K^-1/2 q_t S_t
    y_t = W_o (rmsnorm(o_t) * silu(W_g x_t))

For a head count that is not a power of two the slopes interleave those of the neighbouring powers,
as in ALiBi.  State: ``"S"`` (N, H, K, V) fp32 and the conv tails ``"conv_q"``, ``"conv_k"``, ``"conv_v"``.
"""
from __future__ import annotations

import math

import torch

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
from linear_moe.model.mixers.retention import local_head_slice
from linear_moe.model.parallel import current_sequence_parallel


def alibi_slopes(num_heads: int) -> list[float]:
    """ALiBi's geometric slopes ``2^(-8(h+1)/n)``, interleaved for non-powers of two."""
    def power_of_two(n: int) -> list[float]:
        return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]

    if math.log2(num_heads).is_integer():
        return power_of_two(num_heads)
    closest = 2 ** math.floor(math.log2(num_heads))
    return power_of_two(closest) + alibi_slopes(2 * closest)[0::2][: num_heads - closest]


@register_mixer("lightning")
class LightningAttention(Mixer):
    family = "fixed_decay"

    def __init__(self, config, layer_idx: int = 0, linears: Linears = SINGLE_DEVICE):
        super().__init__(config, layer_idx, linears)
        D, H, V = config.hidden_size, config.num_heads, config.value_dim
        self.num_heads = Hl = linears.local_heads(H)
        self.q_proj, self.k_proj, self.v_proj = conv_qkv_projections(config, linears, self.num_heads)
        self.g_proj = linears.column(D, H * V)
        self.norm = GatedRMSNorm(V, config.norm_eps)
        self.o_proj = linears.row(H * V, D)
        depth = 1 - layer_idx / (config.num_layers - 1) + 1e-5 if config.num_layers > 1 else 1.0
        # a constant of the architecture, not state: plain floats stay out of state dicts and survive
        # meta-device construction (transformers' from_pretrained)
        self.log_decay_H: tuple[float, ...] = tuple(-s * depth for s in alibi_slopes(H)[local_head_slice(linears, Hl)])

    def forward(self, x_BTD, state: MixerState | None = None, cu_seqlens=None, output_state: bool = False):
        check_varlen(x_BTD, cu_seqlens)
        new_state: MixerState | None = {} if output_state else None
        H = self.num_heads
        q, k, v = conv_qkv_heads(self, x_BTD, state, new_state, cu_seqlens)
        if self.q_proj.conv is None:  # the conv carries the silu; without it apply it here
            q, k, v = (torch.nn.functional.silu(t) for t in (q, k, v))
        g = torch.tensor(self.log_decay_H, device=x_BTD.device).expand(*x_BTD.shape[:2], H)
        o, S = current_sequence_parallel().gla(
            q, k, v, g, initial_state=None if state is None else state.get("S"), output_final_state=output_state,
            cu_seqlens=cu_seqlens, backend=core_backend(self.backend, x_BTD, state), chunk_size=self.config.chunk_size,
        )
        o = self.norm(o, split_heads(self.g_proj(x_BTD), H))
        if new_state is not None:
            new_state["S"] = S
        return self.o_proj(merge_heads(o)), new_state
