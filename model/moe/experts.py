"""Routed experts: ``E`` SwiGLUs stored as stacked weights, dispatched by sort and scatter."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Dispatch:
    """Assignments (flat index ``n = t*K + j``) sorted by expert, token order kept within an expert.

    ``token_N`` / ``weight_N`` / ``expert_N`` describe the kept assignments in that order (``N`` =
    number kept); ``kept_per_expert_E`` their counts; ``routed_per_expert_E`` the counts before
    capacity dropping; ``dropped`` how many assignments were over capacity.
    """

    token_N: torch.Tensor
    weight_N: torch.Tensor
    expert_N: torch.Tensor
    kept_per_expert_E: torch.Tensor
    routed_per_expert_E: torch.Tensor
    dropped: torch.Tensor


def expert_capacity(capacity_factor: float | None, num_tokens: int, top_k: int, num_experts: int) -> int | None:
    """``ceil(T * K / E * c)`` assignments per expert (megatron's ``get_capacity``, evaluated in its
    order), or ``None`` (dropless) when ``c`` is ``None``."""
    if capacity_factor is None:
        return None
    return math.ceil((num_tokens * top_k / num_experts) * capacity_factor)


def dispatch(topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor, num_experts: int,
             capacity: int | None = None) -> Dispatch:
    """Sort the ``T*K`` assignments by expert, token order kept within an expert.

    With ``capacity``, each expert keeps its ``capacity`` highest-weight assignments and drops the
    rest: megatron's "probs" drop policy, so the trained (megatron) and exported models drop the same
    tokens. Equal weights (top-1 with renormalisation gives every token weight 1) keep the earlier
    token here, while megatron's ``torch.topk`` breaks such ties in no defined order.
    """
    num_tokens, top_k = topk_idx_TK.shape
    expert_flat = topk_idx_TK.reshape(-1)
    order_A = torch.argsort(expert_flat, stable=True)  # A = T*K; stable keeps token order per expert
    routed_E = torch.bincount(expert_flat, minlength=num_experts)
    kept_E = routed_E
    if capacity is not None:
        heaviest_A = torch.argsort(topk_weight_TK.detach().reshape(-1), descending=True, stable=True)
        ranked_A = heaviest_A[torch.argsort(expert_flat[heaviest_A], stable=True)]  # by expert, heaviest first
        start_E = torch.cumsum(routed_E, 0) - routed_E
        rank_A = torch.arange(ranked_A.numel(), device=ranked_A.device) - start_E[expert_flat[ranked_A]]
        keep_A = torch.zeros_like(expert_flat, dtype=torch.bool)
        keep_A[ranked_A[rank_A < capacity]] = True
        order_A = order_A[keep_A[order_A]]
        kept_E = routed_E.clamp(max=capacity)
    return Dispatch(
        token_N=order_A // top_k,
        weight_N=topk_weight_TK.reshape(-1)[order_A],
        expert_N=expert_flat[order_A],
        kept_per_expert_E=kept_E,
        routed_per_expert_E=routed_E,
        dropped=routed_E.sum() - kept_E.sum(),
    )


class Experts(nn.Module):
    """``E`` SwiGLU experts with weights ``gate_EDF``, ``up_EDF`` (E, D, F) and ``down_EFD`` (E, F, D)."""

    def __init__(self, num_experts: int, hidden_size: int, ffn_hidden_size: int, init_std: float = 0.02):
        super().__init__()
        self.num_experts = num_experts
        self.gate_EDF = nn.Parameter(torch.empty(num_experts, hidden_size, ffn_hidden_size))
        self.up_EDF = nn.Parameter(torch.empty(num_experts, hidden_size, ffn_hidden_size))
        self.down_EFD = nn.Parameter(torch.empty(num_experts, ffn_hidden_size, hidden_size))
        for weight in (self.gate_EDF, self.up_EDF, self.down_EFD):
            nn.init.normal_(weight, mean=0.0, std=init_std)

    def expert(self, e: int, x_ND: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` on ``(N, D)`` tokens -> ``(N, D)``."""
        return (F.silu(x_ND @ self.gate_EDF[e]) * (x_ND @ self.up_EDF[e])) @ self.down_EFD[e]

    def forward(self, x_TD: torch.Tensor, plan: Dispatch) -> torch.Tensor:
        """Gather tokens by ``plan``, run each expert on its contiguous slice, scatter-add weighted outputs.

        Returns ``y_TD`` (dtype of ``x_TD``); tokens whose assignments were all dropped get zeros.
        """
        x_ND = x_TD[plan.token_N]
        counts = plan.kept_per_expert_E.tolist()
        outputs = [self.expert(e, x_nD) for e, x_nD in enumerate(x_ND.split(counts)) if counts[e] > 0]
        out_ND = torch.cat(outputs) if outputs else x_ND
        out_ND = out_ND * plan.weight_N.to(out_ND.dtype).unsqueeze(-1)
        return torch.zeros_like(x_TD).index_add_(0, plan.token_N, out_ND)
