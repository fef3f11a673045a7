"""Router auxiliary losses, unweighted; :class:`~linear_moe.model.moe.layer.MoELayer` applies the coefficients."""
from __future__ import annotations

import torch


def load_balancing_loss(probs_TE: torch.Tensor, topk_idx_TK: torch.Tensor) -> torch.Tensor:
    """Switch/GShard balance loss ``E * sum_e f_e * P_e`` (scalar fp32).

    ``f_e`` is the fraction of the ``T*K`` routed assignments that went to expert ``e`` (counted
    before any capacity dropping; no gradient) and ``P_e`` the mean router probability of ``e``.
    Equals 1 when both are uniform.
    """
    num_tokens, num_experts = probs_TE.shape
    counts_E = torch.bincount(topk_idx_TK.reshape(-1), minlength=num_experts)
    fraction_E = counts_E.to(probs_TE.dtype) / topk_idx_TK.numel()
    mean_prob_E = probs_TE.float().mean(dim=0)
    return num_experts * (fraction_E * mean_prob_E).sum()


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE z-loss ``mean_t logsumexp(logits_t)^2`` (scalar fp32): keeps router logits small."""
    return torch.logsumexp(logits_TE.float(), dim=-1).square().mean()
