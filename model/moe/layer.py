"""The MoE feed-forward: router, routed experts, optional (gated) shared experts, aux losses."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from linear_moe.model.mlp import SwiGLU
from linear_moe.model.moe.experts import Experts, dispatch, expert_capacity
from linear_moe.model.moe.losses import BALANCE_LOSSES, router_z_loss
from linear_moe.model.moe.router import ROUTERS


@dataclass
class MoEStats:
    """Per-layer side outputs of :class:`MoELayer`.

    ``aux_loss`` and ``z_loss`` are fp32 scalars already multiplied by their coefficients (add them to
    the LM loss); ``tokens_per_expert`` (E,) long counts the routed assignments per expert *before*
    capacity dropping (the demand, what bias balancing and load logging need); ``dropped`` (long
    scalar) is how many assignments exceeded capacity (0 when dropless).
    """

    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    tokens_per_expert: torch.Tensor
    dropped: torch.Tensor


class MoELayer(nn.Module):
    """``x_BTD -> (y_BTD, MoEStats)``: top-k routed SwiGLU experts plus shared experts.

    Built from a ``ModelConfig``: ``num_experts``, ``moe_top_k``, ``moe_ffn_hidden_size``,
    ``moe_router``, ``moe_aux_loss_type``, ``num_shared_experts`` (one SwiGLU of width ``n * moe_ffn_hidden_size``),
    ``shared_expert_gate`` (scale it by ``sigmoid(Linear(D, 1))``), ``moe_capacity_factor``,
    ``moe_aux_loss_coeff``, ``moe_z_loss_coeff``, ``moe_bias_update_rate``, ``initializer_range``.
    """

    def __init__(self, config):
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.moe_top_k
        self.capacity_factor = config.moe_capacity_factor
        self.aux_loss_coeff = config.moe_aux_loss_coeff
        self.z_loss_coeff = config.moe_z_loss_coeff
        self.aux_loss_type = config.moe_aux_loss_type
        self.router = ROUTERS[config.moe_router](
            config.hidden_size, config.num_experts, config.moe_top_k,
            init_std=config.initializer_range, bias_update_rate=config.moe_bias_update_rate,
        )
        self.experts = Experts(config.num_experts, config.hidden_size, config.moe_ffn_hidden_size,
                               init_std=config.initializer_range)
        self.shared_experts = None
        self.shared_expert_gate = None
        if config.num_shared_experts > 0:
            self.shared_experts = SwiGLU(config.hidden_size, config.num_shared_experts * config.moe_ffn_hidden_size)
            if config.shared_expert_gate:
                self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)

    def forward(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, MoEStats]:
        x_TD = x_BTD.reshape(-1, x_BTD.shape[-1])
        routing = self.router(x_TD)
        capacity = expert_capacity(self.capacity_factor, x_TD.shape[0], self.top_k, self.num_experts)
        plan = dispatch(routing.topk_idx_TK, routing.topk_weight_TK, self.num_experts, capacity)
        y_TD = self.experts(x_TD, plan)
        if self.shared_experts is not None:
            shared_TD = self.shared_experts(x_TD)
            if self.shared_expert_gate is not None:
                shared_TD = shared_TD * torch.sigmoid(self.shared_expert_gate(x_TD))
            y_TD = y_TD + shared_TD
        stats = MoEStats(
            aux_loss=self.aux_loss_coeff * BALANCE_LOSSES[self.aux_loss_type](
                routing.probs_TE.view(*x_BTD.shape[:2], -1), self.top_k),
            z_loss=self.z_loss_coeff * router_z_loss(routing.logits_TE),
            tokens_per_expert=plan.routed_per_expert_E,
            dropped=plan.dropped,
        )
        return y_TD.reshape(x_BTD.shape), stats

    @torch.no_grad()
    def update_bias(self, tokens_per_expert_E: torch.Tensor) -> None:
        """Forward to the router (acts only for ``sigmoid_bias``); the trainer calls it after each step."""
        self.router.update_bias(tokens_per_expert_E)
