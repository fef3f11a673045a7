"""fla's Triton DPLR op behind our signature (CUDA, or CPU under ``TRITON_INTERPRET=1``)."""
from __future__ import annotations

import torch


def fla_dplr(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    gk: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same contract as :func:`linear_moe.kernels.dplr.dplr`; fla picks its own chunk size."""
    from fla.ops.generalized_delta_rule import chunk_dplr_delta_rule

    o, final = chunk_dplr_delta_rule(q, k, v, a, b, gk, scale=scale,
                                     initial_state=None if initial_state is None else initial_state.float(),
                                     output_final_state=output_final_state, cu_seqlens=cu_seqlens)
    return o.to(v.dtype), (final.float() if output_final_state else None)
