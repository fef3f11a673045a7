"""Map :func:`linear_moe.kernels.gla.gla` onto fla's Triton ops (CUDA, or CPU under TRITON_INTERPRET=1).

* ``u`` given            -> ``fla.ops.rwkv6.chunk_rwkv6`` (g expanded to (B, T, H, K); zeros if None)
* diagonal ``g``         -> ``fla.ops.gla.chunk_gla``
* scalar ``g`` or None   -> ``fla.ops.simple_gla.chunk_simple_gla``

All three take (B, T, H, K) layout, ``scale``, ``initial_state`` (N, H, K, V), ``output_final_state``
and ``cu_seqlens``. fla picks its own chunk size, so ``chunk_size`` is ignored here.
"""
from __future__ import annotations

from typing import Callable

import torch

from linear_moe.kernels.gla.checks import check_gla_inputs, decay_kind


def _rwkv6(q, k, v, g, u, **kwargs):
    from fla.ops.rwkv6 import chunk_rwkv6

    if g is None:
        g = q.new_zeros(q.shape)
    elif g.dim() == 3:
        g = g[..., None].expand(q.shape)
    return chunk_rwkv6(q, k, v, g.contiguous(), u, **kwargs)


def _diagonal(q, k, v, g, u, **kwargs):
    from fla.ops.gla import chunk_gla as fla_chunk_gla

    return fla_chunk_gla(q, k, v, g, **kwargs)


def _scalar(q, k, v, g, u, **kwargs):
    from fla.ops.simple_gla import chunk_simple_gla

    return chunk_simple_gla(q, k, v, g=g, **kwargs)


#: (decay kind, has u) -> fla op adapter
FLA_OPS: dict[tuple[str, bool], Callable] = {
    ("none", False): _scalar,
    ("scalar", False): _scalar,
    ("diagonal", False): _diagonal,
    ("none", True): _rwkv6,
    ("scalar", True): _rwkv6,
    ("diagonal", True): _rwkv6,
}


def fla_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    *,
    u: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same contract as :func:`linear_moe.kernels.gla.gla`, computed by fla's chunked Triton op."""
    check_gla_inputs(q, k, v, g, u, initial_state, cu_seqlens)
    op = FLA_OPS[(decay_kind(g), u is not None)]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    o, final = op(
        q, k, v, g, u, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
        cu_seqlens=None if cu_seqlens is None else cu_seqlens.long(),
    )
    return o.to(v.dtype), (final.float() if output_final_state else None)
