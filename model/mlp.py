"""The SwiGLU feed-forward used by dense layers and as the shared expert of MoE layers."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLU(nn.Module):
    """``x -> down(silu(gate(x)) * up(x))``, no biases; maps ``(..., D) -> (..., D)`` via width ``F``."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int):
        super().__init__()
        if hidden_size <= 0 or ffn_hidden_size <= 0:
            raise ValueError(
                f"SwiGLU: hidden_size={hidden_size} and ffn_hidden_size={ffn_hidden_size} must be positive"
            )
        self.gate_proj = nn.Linear(hidden_size, ffn_hidden_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, ffn_hidden_size, bias=False)
        self.down_proj = nn.Linear(ffn_hidden_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
