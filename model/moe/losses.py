"""Router auxiliary losses, unweighted; :class:`~linear_moe.model.moe.layer.MoELayer` applies the coefficients.

The load-balancing losses are registered by name (``ModelConfig.moe_aux_loss_type``), with the names
megatron-core gives them (``moe_router_load_balancing_type``), which computes the same functions.
"""
from __future__ import annotations

from typing import Callable

import torch


def _balance_per_row(probs_BTE: torch.Tensor, top_k: int) -> torch.Tensor:
    """``E * sum_e f_be * P_be`` for each row ``b`` (B,) fp32.

    ``f_be`` is the fraction of row b's ``T*k`` top-k assignments that go to expert ``e`` (no gradient)
    and ``P_be`` the mean probability of ``e`` over the row. The assignments are the top-k of
    ``probs`` themselves: a selection bias (``sigmoid_bias``) is not counted, as in DeepSeek-V3 and
    megatron. Equals 1 when both are uniform.
    """
    batch, tokens, num_experts = probs_BTE.shape
    topk_idx_BN = probs_BTE.detach().topk(top_k, dim=-1).indices.reshape(batch, -1)
    counts_BE = torch.zeros(batch, num_experts, dtype=torch.float32, device=probs_BTE.device).scatter_add_(
        1, topk_idx_BN, torch.ones_like(topk_idx_BN, dtype=torch.float32))
    fraction_BE = counts_BE / max(tokens * top_k, 1)
    mean_prob_BE = probs_BTE.float().mean(dim=1)
    return num_experts * (fraction_BE * mean_prob_BE).sum(dim=-1)


def load_balancing_loss(probs_BTE: torch.Tensor, top_k: int) -> torch.Tensor:
    """Switch/GShard balance loss over all ``B*T`` tokens of the micro-batch (scalar fp32)."""
    return _balance_per_row(probs_BTE.reshape(1, -1, probs_BTE.shape[-1]), top_k)[0]


def sequence_load_balancing_loss(probs_BTE: torch.Tensor, top_k: int) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss: the balance loss of each sequence (row), averaged."""
    return _balance_per_row(probs_BTE, top_k).mean()


#: ``ModelConfig.moe_aux_loss_type`` -> ``loss(probs_BTE, top_k)``
BALANCE_LOSSES: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
    "aux_loss": load_balancing_loss,
    "seq_aux_loss": sequence_load_balancing_loss,
}


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE z-loss ``mean_t logsumexp(logits_t)^2`` (scalar fp32): keeps router logits small."""
    return torch.logsumexp(logits_TE.float(), dim=-1).square().mean()
