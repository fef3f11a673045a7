"""Numerical comparison helpers used by tests and benchmarks."""
from __future__ import annotations

import torch


def rel_error(reference: torch.Tensor, actual: torch.Tensor) -> float:
    """RMS of the difference over the RMS of the reference (0 when both are exactly zero)."""
    reference = reference.detach().double()
    actual = actual.detach().double()
    if reference.shape != actual.shape:
        raise ValueError(f"shape mismatch: reference {tuple(reference.shape)} vs actual {tuple(actual.shape)}")
    diff = (reference - actual).pow(2).mean().sqrt()
    base = reference.pow(2).mean().sqrt()
    if base == 0:
        return float(diff)
    return float(diff / base)


def assert_rel_close(name: str, reference: torch.Tensor, actual: torch.Tensor, ratio: float) -> None:
    """Assert ``rel_error(reference, actual) <= ratio`` with a message naming the tensor."""
    if not torch.isfinite(actual).all():
        raise AssertionError(f"{name}: non-finite values in the result")
    err = rel_error(reference, actual)
    if err > ratio:
        raise AssertionError(f"{name}: relative error {err:.3e} exceeds {ratio:.1e}")
