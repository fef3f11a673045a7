"""fla's Triton delta-rule ops behind our signature (CUDA, or CPU under ``TRITON_INTERPRET=1``).

``fla.ops.delta_rule.chunk_delta_rule`` asserts on fp32 inputs, so fp32 without a gate goes through
``chunk_gated_delta_rule`` with ``g = 0`` (the same recurrence).
"""
from __future__ import annotations

import torch


def fla_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same contract as :func:`linear_moe.kernels.delta_rule.delta_rule`; ``chunk_size`` is fla's own (64)."""
    common = dict(scale=scale, initial_state=initial_state, output_final_state=output_final_state,
                  cu_seqlens=cu_seqlens)
    if g is None and q.dtype != torch.float32:
        from fla.ops.delta_rule import chunk_delta_rule

        return chunk_delta_rule(q, k, v, beta, **common)
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    if g is None:
        g = beta.new_zeros(beta.shape, dtype=torch.float32)
    return chunk_gated_delta_rule(q, k, v, g, beta, **common)
