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


def assert_packed_grads_match_separate_runs(op, inputs: dict, initial_state: torch.Tensor, cu_seqlens: torch.Tensor,
                                            ratio: float, **packed_kwargs) -> None:
    """Gradients of one packed run of ``op`` equal those of separate naive runs, one per sequence.

    ``op(**inputs, initial_state=..., output_final_state=True, cu_seqlens=..., backend=...)`` is a
    recurrence core; ``inputs`` are ``(1, T, ...)`` leaves (``None`` entries skipped) and
    ``initial_state`` ``(N, ...)``. The loss weighs the outputs and the final states randomly, so no
    gradient cancels; both runs differentiate it with respect to the same leaves.
    """
    leaves = {name: t for name, t in inputs.items() if t is not None}
    leaves["initial_state"] = initial_state
    generator = torch.Generator().manual_seed(7)
    o, final = op(**inputs, initial_state=initial_state, output_final_state=True, cu_seqlens=cu_seqlens,
                  **packed_kwargs)
    w_o, w_final = torch.randn(o.shape, generator=generator), torch.randn(final.shape, generator=generator)
    packed = torch.autograd.grad((o * w_o).sum() + (final * w_final).sum(), list(leaves.values()))
    loss = 0.0
    bounds = cu_seqlens.tolist()
    for n, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        part = {name: None if t is None else t[:, start:end] for name, t in inputs.items()}
        o_n, final_n = op(**part, initial_state=initial_state[n:n + 1], output_final_state=True, backend="naive")
        loss = loss + (o_n * w_o[:, start:end]).sum() + (final_n * w_final[n:n + 1]).sum()
    separate = torch.autograd.grad(loss, list(leaves.values()))
    for name, ref, act in zip(leaves, separate, packed):
        assert_rel_close(f"grad {name}", ref, act, ratio)
