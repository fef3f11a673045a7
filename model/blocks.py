"""One Linear-MoE layer: pre-norm sequence mixer, then pre-norm feed-forward (MoE or dense)."""
from __future__ import annotations

import torch
from torch import nn

from linear_moe.model.layer_pattern import LayerKind
from linear_moe.model.mixers import MIXERS, MixerState
from linear_moe.model.mlp import SwiGLU
from linear_moe.model.moe import MoELayer, MoEStats

ATTENTION_MIXER = "attention"


class Block(nn.Module):
    """``x -> x + mixer(norm(x)) -> x + ffn(norm(x))``; the kind comes from the layer pattern."""

    def __init__(self, config, layer_idx: int, kind: LayerKind):
        super().__init__()
        self.kind = kind
        mixer_name = ATTENTION_MIXER if kind.is_attention else config.lsm_mixer
        self.mixer_norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.mixer = MIXERS[mixer_name](config, layer_idx)
        self.ffn_norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.ffn = MoELayer(config) if kind.is_moe else SwiGLU(config.hidden_size, config.ffn_hidden_size)

    def forward(
        self,
        x_BTD: torch.Tensor,
        state: MixerState | None = None,
        cu_seqlens: torch.LongTensor | None = None,
        output_state: bool = False,
    ) -> tuple[torch.Tensor, MixerState | None, MoEStats | None]:
        mixed_BTD, new_state = self.mixer(self.mixer_norm(x_BTD), state=state, cu_seqlens=cu_seqlens,
                                          output_state=output_state)
        x_BTD = x_BTD + mixed_BTD
        stats = None
        if self.kind.is_moe:
            ffn_BTD, stats = self.ffn(self.ffn_norm(x_BTD))
        else:
            ffn_BTD = self.ffn(self.ffn_norm(x_BTD))
        return x_BTD + ffn_BTD, new_state, stats
