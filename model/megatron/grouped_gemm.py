"""The ``gmm`` op of megatron's grouped-GEMM experts, for hosts without the ``grouped_gemm`` package.

megatron-core 0.16.1's legacy ``GroupedMLP`` (``moe_grouped_gemm=True`` with the local, non-Transformer-
Engine spec) asserts ``grouped_gemm_util.grouped_gemm_is_available()`` when it is built and calls
``grouped_gemm_util.ops.gmm(a, b, batch_sizes, trans_b=False)`` in its forward. Both come from the
``grouped_gemm`` CUDA extension (fanshiqing/grouped_gemm), which has no wheel here and no CPU build.
:func:`install_gmm` puts :func:`gmm` in its place (and leaves a real ``grouped_gemm`` alone).

Backends of :func:`gmm`, chosen per call:

* ``torch._grouped_mm`` (:func:`torch_grouped_mm_gmm`, differentiable): CUDA, bf16 operands, compute
  capability 9.0+ (where its grouped kernel runs), 16-byte aligned ``K`` and ``N``, fewer than 1024
  experts, at least one row.
* :func:`naive_gmm`, everywhere else (CPU, fp32, unaligned shapes): one matmul per expert, the oracle.

Pinned to megatron-core 0.16.1: :func:`install_gmm` checks the version, like the CPU patches do.
"""
from __future__ import annotations

import types

import torch

#: ``torch._grouped_mm``'s bf16 kernel takes fewer groups than this
_GROUPED_MM_MAX_GROUPS = 1024


def gmm(a_TK: torch.Tensor, b_EKN: torch.Tensor, batch_sizes_E, trans_b: bool = False) -> torch.Tensor:
    """``grouped_gemm.ops.gmm``'s contract: ``torch._grouped_mm`` where supported, else :func:`naive_gmm`."""
    if torch_grouped_mm_supported(a_TK, b_EKN, trans_b):
        return torch_grouped_mm_gmm(a_TK, b_EKN, batch_sizes_E, trans_b)
    return naive_gmm(a_TK, b_EKN, batch_sizes_E, trans_b)


#: stands in for the ``grouped_gemm`` package: megatron reads ``grouped_gemm.ops.gmm``
GMM_PACKAGE = types.SimpleNamespace(ops=types.SimpleNamespace(gmm=gmm))


def install_gmm() -> str:
    """Make megatron's ``grouped_gemm_util`` use :func:`gmm` unless the ``grouped_gemm`` package is there.

    Sets ``grouped_gemm_util.grouped_gemm`` (what ``grouped_gemm_is_available`` tests) and
    ``grouped_gemm_util.ops``. Idempotent. Returns the backend megatron now uses: ``"grouped_gemm"``
    (the package) or ``"linear_moe"`` (this module). Raises ``RuntimeError`` for a megatron-core other
    than the pinned version.
    """
    from megatron.core.transformer.moe import grouped_gemm_util

    from linear_moe.model.megatron.cpu_compat import check_megatron_version

    check_megatron_version()
    if grouped_gemm_util.grouped_gemm is not None and grouped_gemm_util.grouped_gemm is not GMM_PACKAGE:
        return "grouped_gemm"
    grouped_gemm_util.grouped_gemm = GMM_PACKAGE
    grouped_gemm_util.ops = GMM_PACKAGE.ops
    return "linear_moe"


def torch_grouped_mm_supported(a_TK: torch.Tensor, b_EKN: torch.Tensor, trans_b: bool = False) -> bool:
    """Whether :func:`torch_grouped_mm_gmm` takes these operands (see the module docstring)."""
    if not hasattr(torch, "_grouped_mm") or not (a_TK.is_cuda and b_EKN.is_cuda):
        return False
    if a_TK.dtype != torch.bfloat16 or b_EKN.dtype != torch.bfloat16:
        return False
    if torch.cuda.get_device_capability(a_TK.device) < (9, 0) or a_TK.shape[0] == 0:
        return False  # (its backward rejects an empty a; GroupedMLP never sends one anyway)
    K, N = (b_EKN.shape[2], b_EKN.shape[1]) if trans_b else (b_EKN.shape[1], b_EKN.shape[2])
    alignment = 16 // a_TK.element_size()
    return K % alignment == 0 and N % alignment == 0 and b_EKN.shape[0] < _GROUPED_MM_MAX_GROUPS


def torch_grouped_mm_gmm(a_TK: torch.Tensor, b_EKN: torch.Tensor, batch_sizes_E,
                         trans_b: bool = False) -> torch.Tensor:
    """:func:`naive_gmm` through one ``torch._grouped_mm`` call (no host synchronisation)."""
    _check_gmm_args(a_TK, b_EKN, batch_sizes_E, trans_b, sync=False)
    sizes = torch.as_tensor(batch_sizes_E, device=a_TK.device)
    offsets_E = torch.cumsum(sizes, dim=0, dtype=torch.int32)  # end row of each expert
    weights = b_EKN.contiguous().transpose(-2, -1) if trans_b else b_EKN.contiguous()  # no-ops for GroupedMLP
    return _ContiguousGrad.apply(torch._grouped_mm(a_TK.contiguous(), weights, offs=offsets_E))


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous: ``torch._grouped_mm``'s backward
    rejects stride-0 gradients (e.g. those of ``out.sum()``)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def naive_gmm(a_TK: torch.Tensor, b_EKN: torch.Tensor, batch_sizes_E, trans_b: bool = False) -> torch.Tensor:
    """``out[rows of expert e] = a[rows of expert e] @ b[e]``: the reference grouped GEMM.

    ``a_TK`` (T, K): rows sorted by expert; ``b_EKN`` (E, K, N), or (E, N, K) with ``trans_b``;
    ``batch_sizes_E`` (E,) rows per expert, summing to T (tensor on any device, or a sequence).
    Returns (T, N) in ``a_TK``'s dtype; differentiable in ``a_TK`` and ``b_EKN``.
    """
    sizes = _check_gmm_args(a_TK, b_EKN, batch_sizes_E, trans_b)
    weights = b_EKN.transpose(-2, -1) if trans_b else b_EKN
    rows = a_TK.split(sizes, dim=0)
    return torch.cat([rows_e @ weights[e] for e, rows_e in enumerate(rows)], dim=0)


def _check_gmm_args(a_TK, b_EKN, batch_sizes_E, trans_b, sync=True) -> list[int] | None:
    if a_TK.dim() != 2 or b_EKN.dim() != 3:
        raise ValueError(f"gmm: expected a (T, K) and b (E, K, N), got a {tuple(a_TK.shape)} "
                         f"and b {tuple(b_EKN.shape)}")
    K = b_EKN.shape[2] if trans_b else b_EKN.shape[1]
    if a_TK.shape[1] != K:
        raise ValueError(f"gmm: a {tuple(a_TK.shape)} and b {tuple(b_EKN.shape)} (trans_b={trans_b}) "
                         f"disagree on K; expected a of shape (T, {K})")
    if len(batch_sizes_E) != b_EKN.shape[0]:
        raise ValueError(f"gmm: batch_sizes has {len(batch_sizes_E)} entries, expected one per expert "
                         f"({b_EKN.shape[0]})")
    if not sync:
        return None
    sizes = [int(s) for s in (batch_sizes_E.tolist() if torch.is_tensor(batch_sizes_E) else batch_sizes_E)]
    if sum(sizes) != a_TK.shape[0]:
        raise ValueError(f"gmm: batch_sizes sum to {sum(sizes)}, expected the {a_TK.shape[0]} rows of a")
    return sizes
