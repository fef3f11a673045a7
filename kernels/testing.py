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


def assert_rel_close(name: str, reference: torch.Tensor, actual: torch.Tensor, ratio: float,
                     allow_empty: bool = False) -> None:
    """Assert ``rel_error(reference, actual) <= ratio`` with a message naming the tensor.

    Both must be finite, and non-empty unless ``allow_empty`` (then two empty tensors of one shape
    pass): a NaN reference or an empty comparison would otherwise pass unnoticed.
    """
    reference, actual = torch.as_tensor(reference), torch.as_tensor(actual)
    if reference.numel() == 0:
        if not allow_empty:
            raise AssertionError(f"{name}: empty tensors, nothing is compared (pass allow_empty=True if intended)")
        if reference.shape != actual.shape:
            raise AssertionError(f"{name}: shape {tuple(actual.shape)} != reference {tuple(reference.shape)}")
        return
    for role, tensor in (("reference", reference), ("result", actual)):
        if not torch.isfinite(tensor).all():
            raise AssertionError(f"{name}: non-finite values in the {role}")
    err = rel_error(reference, actual)
    if not err <= ratio:
        raise AssertionError(f"{name}: relative error {err:.3e} exceeds {ratio:.1e}")
