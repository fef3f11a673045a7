"""Top-k routers, registered by name (``ModelConfig.moe_router``).

Every router maps ``x_TD`` to a :class:`Routing`: which ``k`` experts each token uses, with what
weight, plus the fp32 logits and probabilities the auxiliary losses need.  Logits are computed in
fp32 whatever the activation dtype: routing decisions are sensitive to rounding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

ROUTERS: dict[str, type["Router"]] = {}

R = TypeVar("R", bound=type["Router"])


def register_router(name: str) -> Callable[[R], R]:
    """Class decorator: make the router available as ``ModelConfig.moe_router == name``."""

    def decorator(cls: R) -> R:
        if name in ROUTERS:
            raise ValueError(f"router {name!r} registered twice ({ROUTERS[name].__name__} and {cls.__name__})")
        ROUTERS[name] = cls
        cls.registry_name = name
        return cls

    return decorator


@dataclass
class Routing:
    """One router decision for ``T`` tokens over ``E`` experts, ``K`` experts per token.

    ``topk_idx_TK`` (long) and ``topk_weight_TK`` (fp32) give each token's experts and weights;
    ``logits_TE`` feeds the z-loss and ``probs_TE`` (rows sum to 1) the load-balancing loss.
    """

    topk_idx_TK: torch.Tensor
    topk_weight_TK: torch.Tensor
    logits_TE: torch.Tensor
    probs_TE: torch.Tensor


class Router(nn.Module):
    """Base class: a bias-free linear gate ``weight`` of shape ``(E, D)``; subclasses pick top-k."""

    registry_name: str = ""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, init_std: float = 0.02,
                 bias_update_rate: float = 0.0):
        super().__init__()
        if not 0 < top_k <= num_experts:
            raise ValueError(f"{type(self).__name__}: top_k={top_k} must be in [1, num_experts={num_experts}]")
        self.num_experts = num_experts
        self.top_k = top_k
        self.bias_update_rate = bias_update_rate
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        nn.init.normal_(self.weight, mean=0.0, std=init_std)

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        """``(T, D) -> (T, E)`` fp32 router logits."""
        return F.linear(x_TD.float(), self.weight.float())

    def forward(self, x_TD: torch.Tensor) -> Routing:
        raise NotImplementedError

    @torch.no_grad()
    def update_bias(self, tokens_per_expert_E: torch.Tensor) -> None:
        """Called by the trainer after each optimizer step; only bias-balanced routers act on it."""


@register_router("softmax_topk")
class SoftmaxTopKRouter(Router):
    """Softmax over all experts, keep the top-k probabilities as weights (not renormalised)."""

    def forward(self, x_TD: torch.Tensor) -> Routing:
        logits_TE = self.logits(x_TD)
        probs_TE = logits_TE.softmax(dim=-1)
        topk_weight_TK, topk_idx_TK = probs_TE.topk(self.top_k, dim=-1)
        return Routing(topk_idx_TK, topk_weight_TK, logits_TE, probs_TE)


@register_router("mixtral")
class MixtralRouter(Router):
    """Top-k logits, then a softmax over those k (weights sum to 1 per token)."""

    def forward(self, x_TD: torch.Tensor) -> Routing:
        logits_TE = self.logits(x_TD)
        topk_logits_TK, topk_idx_TK = logits_TE.topk(self.top_k, dim=-1)
        return Routing(topk_idx_TK, topk_logits_TK.softmax(dim=-1), logits_TE, logits_TE.softmax(dim=-1))


@register_router("sigmoid_bias")
class SigmoidBiasRouter(Router):
    """DeepSeek-V3 auxiliary-loss-free routing.

    Scores are ``sigmoid(logits)``.  A non-learned per-expert ``expert_bias_E`` is added to the scores
    only to *select* the top-k; the weights are the unbiased scores of the selected experts,
    normalised over the k.  :meth:`update_bias` nudges the bias by ``rate * sign(mean_load - load)``
    so that overloaded experts become less likely to be picked.  ``probs_TE`` are the scores
    normalised over all experts (for an optional balancing loss).
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, init_std: float = 0.02,
                 bias_update_rate: float = 0.0):
        super().__init__(hidden_size, num_experts, top_k, init_std, bias_update_rate)
        self.register_buffer("expert_bias_E", torch.zeros(num_experts))

    def _apply(self, fn, recurse=True):
        """Keep ``expert_bias_E`` fp32 under ``.to(bf16)``: steps of ``rate`` would round away."""
        bias_E = self.expert_bias_E
        super()._apply(fn, recurse)
        self.expert_bias_E = bias_E.to(self.expert_bias_E.device)
        return self

    def forward(self, x_TD: torch.Tensor) -> Routing:
        logits_TE = self.logits(x_TD)
        scores_TE = logits_TE.sigmoid()
        topk_idx_TK = (scores_TE.detach() + self.expert_bias_E).topk(self.top_k, dim=-1).indices
        topk_scores_TK = scores_TE.gather(1, topk_idx_TK)
        topk_weight_TK = topk_scores_TK / topk_scores_TK.sum(dim=-1, keepdim=True)
        probs_TE = scores_TE / scores_TE.sum(dim=-1, keepdim=True)
        return Routing(topk_idx_TK, topk_weight_TK, logits_TE, probs_TE)

    @torch.no_grad()
    def update_bias(self, tokens_per_expert_E: torch.Tensor) -> None:
        """``tokens_per_expert_E`` (E,): assignments per expert over the last step (any dtype)."""
        if tokens_per_expert_E.shape != (self.num_experts,):
            raise ValueError(
                f"update_bias: tokens_per_expert must have shape ({self.num_experts},), "
                f"got {tuple(tokens_per_expert_E.shape)}"
            )
        load_E = tokens_per_expert_E.to(self.expert_bias_E.device, torch.float32)
        self.expert_bias_E += self.bias_update_rate * torch.sign(load_E.mean() - load_E)
