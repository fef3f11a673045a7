"""fla's Triton delta-rule ops behind our signature (CUDA, or CPU under ``TRITON_INTERPRET=1``).

* bf16/fp16 without a gate -> ``fla.ops.delta_rule.chunk_delta_rule`` (it asserts on fp32 inputs);
* otherwise -> ``fla.ops.gated_delta_rule.chunk_gated_delta_rule``, with ``g = 0`` when there is no
  gate (the same recurrence);
* where fla refuses that op's gated backward
  (:func:`~linear_moe.kernels.backend.fla_gated_backward_refused`) -> ``fla.ops.kda.chunk_kda``, whose
  per-channel gate takes the scalar gate broadcast over K: ``S_t = (I - b k k^T) diag(e^g) S_{t-1} +
  b k v^T`` is then the gated delta rule, with backward kernels of its own.
"""
from __future__ import annotations

import torch

from linear_moe.kernels import backend


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
    common = dict(scale=scale, initial_state=None if initial_state is None else initial_state.float(),
                  output_final_state=output_final_state, cu_seqlens=cu_seqlens)
    if g is None and q.dtype != torch.float32:
        from fla.ops.delta_rule import chunk_delta_rule

        o, final = chunk_delta_rule(q, k, v, beta, **common)
    else:
        if g is None:
            g = beta.new_zeros(beta.shape, dtype=torch.float32)
        if backend.fla_gated_backward_refused():
            from fla.ops.kda import chunk_kda

            o, final = chunk_kda(q, k, v, g[..., None].expand(q.shape).contiguous(), beta, **common)
        else:
            from fla.ops.gated_delta_rule import chunk_gated_delta_rule

            o, final = chunk_gated_delta_rule(q, k, v, g, beta, **common)
    return o.to(v.dtype), (final.float() if output_final_state else None)
