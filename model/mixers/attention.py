"""Softmax attention, the hybrid partner of the LSM mixers: SDPA with GQA and RoPE.

    q, k = rope(W_q x), rope(W_k x)   (num_kv_heads key/value heads shared by groups of query heads)
    o = softmax(q k^T / sqrt(d) + mask) v     y = W_o o

Packed documents (``cu_seqlens``) attend through a block-diagonal causal mask.  State (the KV cache):
``"k"`` and ``"v"`` of shape (B, S, H_kv, d), keys stored after RoPE; a call with a cache continues
positions at ``S`` (one-token decoding or a longer continuation).  A cache cannot be combined with
``cu_seqlens``: the rows of a cache have one length.  Under sequence parallelism the queries of this
rank's chunk attend over the K and V all-gathered from the SP group (LASP-2H), at global positions.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from linear_moe.model.mixers.base import SINGLE_DEVICE, Linears, Mixer, MixerState, register_mixer
from linear_moe.model.mixers.common import (
    apply_rope,
    check_varlen,
    merge_heads,
    sequence_ids,
    split_heads,
    token_positions,
)
from linear_moe.model.parallel import active_sequence_parallel


def causal_mask(T: int, S: int, cu_seqlens: torch.Tensor | None, device) -> torch.Tensor:
    """Boolean ``(T, S)`` mask, True = attend: query ``i`` (at position ``S - T + i``) sees keys ``<=`` it,
    and only inside its own packed document."""
    q_pos = torch.arange(S - T, S, device=device)
    mask = q_pos[:, None] >= torch.arange(S, device=device)[None, :]
    if cu_seqlens is not None:
        doc = sequence_ids(cu_seqlens)
        mask = mask & (doc[:, None] == doc[None, :])
    return mask


@register_mixer("attention")
class Attention(Mixer):
    family = "attention"

    def __init__(self, config, layer_idx: int = 0, linears: Linears = SINGLE_DEVICE):
        super().__init__(config, layer_idx, linears)
        D, d = config.hidden_size, config.head_dim
        self.num_heads = linears.local_heads(config.num_heads)
        self.num_kv_heads = linears.local_heads(config.num_kv_heads, "num_kv_heads")
        self.head_dim = d
        self.q_proj = linears.column(D, config.num_heads * d)
        self.k_proj = linears.column(D, config.num_kv_heads * d)
        self.v_proj = linears.column(D, config.num_kv_heads * d)
        self.o_proj = linears.row(config.num_heads * d, D)

    @classmethod
    def validate_config(cls, config) -> None:
        if config.head_dim % 2:
            raise ValueError(
                f"ModelConfig.num_heads: attention applies RoPE, so head_dim = hidden_size / num_heads "
                f"= {config.head_dim} must be even"
            )

    def forward(self, x_BTD, state: MixerState | None = None, cu_seqlens=None, output_state: bool = False):
        check_varlen(x_BTD, cu_seqlens)
        if cu_seqlens is not None and (state is not None or output_state):
            raise ValueError("attention: a KV cache (state / output_state) cannot be used with cu_seqlens; "
                             "decode unpacked sequences instead")
        B, T, _ = x_BTD.shape
        past = 0 if state is None else state["k"].shape[1]
        offset_N = torch.full((B,), past, dtype=torch.long, device=x_BTD.device)
        pos_BT = token_positions(x_BTD, cu_seqlens, offset_N if past else None)
        theta = self.config.rope_theta
        q = apply_rope(split_heads(self.q_proj(x_BTD), self.num_heads), pos_BT, theta)
        k = apply_rope(split_heads(self.k_proj(x_BTD), self.num_kv_heads), pos_BT, theta)
        v = split_heads(self.v_proj(x_BTD), self.num_kv_heads)
        sp = active_sequence_parallel()
        if sp is not None:
            if state is not None or output_state:
                raise ValueError("attention: a KV cache (state / output_state) is not supported under sequence "
                                 "parallelism; run decoding without a SequenceParallelContext")
            return self.o_proj(merge_heads(sp.attention(q, k, v, cu_seqlens=cu_seqlens))), None
        if state is not None:
            k = torch.cat([state["k"].to(k.dtype), k], dim=1)
            v = torch.cat([state["v"].to(v.dtype), v], dim=1)
        mask = causal_mask(T, k.shape[1], cu_seqlens, x_BTD.device)
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
            enable_gqa=self.num_heads != self.num_kv_heads,
        ).transpose(1, 2)
        return self.o_proj(merge_heads(o)), ({"k": k, "v": v} if output_state else None)
