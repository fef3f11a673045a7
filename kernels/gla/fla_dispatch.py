"""Map :func:`linear_moe.kernels.gla.gla` onto fla's Triton ops (CUDA, or CPU under TRITON_INTERPRET=1).

* ``u`` given            -> ``fla.ops.rwkv6.chunk_rwkv6`` (g expanded to (B, T, H, K); zeros if None)
* diagonal ``g``         -> ``fla.ops.gla.chunk_gla``
* scalar ``g`` or None   -> ``fla.ops.simple_gla.chunk_simple_gla``; a scalar ``g`` goes to ``chunk_gla``
  (broadcast over K) where fla refuses ``chunk_simple_gla``'s gated backward
  (:func:`~linear_moe.kernels.backend.fla_gated_backward_refused`)

All three take (B, T, H, K) layout, ``scale``, ``initial_state`` (N, H, K, V) fp32,
``output_final_state`` and ``cu_seqlens``. fla picks its own chunk size, so ``chunk_size`` is ignored
here. A value dim below 16, or odd, is zero-padded to ``max(16, even)`` and the output and state are
sliced back: fla's kernels tile V in blocks of at least 16 for ``tl.dot`` (``chunk_gla_bwd_dA`` uses
``BV = next_power_of_2(V)``) and its bf16 backward asserts an even V. GSA's slot pass has V = 1.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from linear_moe.kernels import backend
from linear_moe.kernels.gla.checks import check_gla_inputs, decay_kind

MIN_VALUE_DIM = 16


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
    if g is not None and backend.fla_gated_backward_refused():
        return _diagonal(q, k, v, g[..., None].expand(q.shape).contiguous(), u, **kwargs)
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
    V = v.shape[-1]
    pad = max(MIN_VALUE_DIM, V + V % 2) - V
    if pad:
        v = F.pad(v, (0, pad))
        initial_state = None if initial_state is None else F.pad(initial_state, (0, pad))
    o, final = op(
        q, k, v, g, u, scale=scale, initial_state=None if initial_state is None else initial_state.float(),
        output_final_state=output_final_state, cu_seqlens=None if cu_seqlens is None else cu_seqlens.long(),
    )
    return o[..., :V].to(v.dtype), (final[..., :V].float() if output_final_state else None)
