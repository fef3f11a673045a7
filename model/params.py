"""Parameter counts: total and activated (what one token touches) for a config."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from linear_moe.model.config import ModelConfig


@dataclass(frozen=True)
class ParameterCount:
    total: int
    activated: int

    def __str__(self) -> str:
        return f"total {self.total / 1e9:.2f}B, activated {self.activated / 1e9:.2f}B"


def count_parameters(config: ModelConfig) -> ParameterCount:
    """Count by building the model on the meta device (no memory, exact for the implementation).

    Activated parameters exclude the routed experts a token does not use: per MoE layer,
    ``(num_experts - moe_top_k) / num_experts`` of the routed-expert weights.
    """
    from linear_moe.model.modeling import LinearMoEConfig, LinearMoEForCausalLM
    from linear_moe.model.moe import MoELayer

    with torch.device("meta"):
        model = LinearMoEForCausalLM(LinearMoEConfig.from_model_config(config))
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for module in model.modules():
        if isinstance(module, MoELayer):
            routed = sum(p.numel() for p in module.experts.parameters())
            inactive += routed * (config.num_experts - config.moe_top_k) // config.num_experts
    return ParameterCount(total=total, activated=total - inactive)
