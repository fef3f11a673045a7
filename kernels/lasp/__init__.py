"""LASP-2 state algebra: per-chunk affine maps, their prefix/suffix composition, the state correction.

The math only (no collectives): ``linear_moe.model.parallel.sequence_parallel`` exchanges the
per-rank maps and calls these. Each op has a PyTorch reference (``naive.py``) and Triton kernels.
"""
from linear_moe.kernels.lasp.backend import LASP_BACKENDS, resolve_lasp_backend
from linear_moe.kernels.lasp.compose import prefix_compose, prefix_compose_states, suffix_compose
from linear_moe.kernels.lasp.correction import state_correction
from linear_moe.kernels.lasp.naive import (
    apply_transition,
    naive_prefix_compose,
    naive_state_correction,
    naive_suffix_compose,
)

__all__ = [
    "LASP_BACKENDS", "resolve_lasp_backend", "prefix_compose", "prefix_compose_states", "suffix_compose",
    "state_correction", "apply_transition", "naive_prefix_compose", "naive_suffix_compose",
    "naive_state_correction",
]
