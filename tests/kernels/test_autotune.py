"""``kernels.autotune``: the bound on Triton's autotuning (``LINEAR_MOE_AUTOTUNE_CONFIGS``).

Reference: the configs Triton's own ``Autotuner.prune_configs`` returns without the bound, for a
kernel of ours and for one of fla's (``fla_cache_autotune``, a subclass). Pruning needs no GPU.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import triton
import triton.language as tl

from linear_moe.kernels.autotune import ENV, current_limit, limit_autotune

CONFIGS = [triton.Config({"BLOCK": block}, num_warps=warps, num_stages=stages)
           for block in (16, 32) for warps in (1, 2, 4, 8) for stages in (2, 3, 4)]


def _drop_block_16(configs, nargs, **kwargs):
    return [config for config in configs if config.kwargs["BLOCK"] != 16]


@triton.autotune(configs=CONFIGS, key=["n"], prune_configs_by={"early_config_prune": _drop_block_16})
@triton.jit
def _scale_kernel(x_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(x_ptr + offsets, tl.load(x_ptr + offsets, mask=offsets < n) * 2, mask=offsets < n)


def _pruned(autotuner) -> list:
    autotuner.nargs = {}  # Autotuner.run sets it before pruning
    return autotuner.prune_configs({})


@pytest.fixture
def bound():
    """Restore the process-wide bound after the test."""
    saved = current_limit()
    yield limit_autotune
    limit_autotune(saved)


def _describe(config) -> tuple:
    return config.kwargs["BLOCK"], config.num_warps, config.num_stages


def test_bound_keeps_the_kernels_own_pruning_and_prefers_default_warps_and_stages(bound):
    bound(None)
    unbounded = _pruned(_scale_kernel)
    assert [c.kwargs["BLOCK"] for c in unbounded] == [32] * 12, "the kernel's own pruning (no BLOCK=16) must hold"
    bound(1)
    assert [_describe(c) for c in _pruned(_scale_kernel)] == [(32, 4, 3)]
    bound(3)
    kept = [_describe(c) for c in _pruned(_scale_kernel)]
    assert kept[0] == (32, 4, 3) and len(kept) == 3
    assert [(w, s) for _, w, s in kept[1:]] == [(2, 3), (4, 2)]  # one step from the defaults, in kernel order
    assert all(_describe(c) in [_describe(u) for u in unbounded] for c in _pruned(_scale_kernel))
    bound(None)
    assert [_describe(c) for c in _pruned(_scale_kernel)] == [_describe(c) for c in unbounded]


def test_bound_covers_fla_kernels(bound):
    from fla.ops.gla.chunk import chunk_gla_fwd_A_kernel_intra_sub_inter
    from fla.ops.utils.cache import CachedAutotuner

    fla_kernel = chunk_gla_fwd_A_kernel_intra_sub_inter.fn  # under its @triton.heuristics
    assert isinstance(fla_kernel, CachedAutotuner)
    bound(None)
    unbounded = _pruned(fla_kernel)
    assert len(unbounded) > 10
    bound(1)
    (kept,) = _pruned(fla_kernel)
    assert (kept.num_warps, kept.num_stages) == (4, 3)
    assert kept.kwargs == unbounded[0].kwargs, "among equals the kernel's own order (small blocks first) decides"


def test_bad_bounds_are_refused(bound):
    for value in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="max_configs must be a positive int"):
            bound(value)


@pytest.mark.parametrize("value, expected", [("2", "2"), ("", "None")])
def test_environment_variable_is_applied_on_import(value, expected):
    code = "import linear_moe.kernels; from linear_moe.kernels.autotune import current_limit; print(current_limit())"
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, ENV: value}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == expected


@pytest.mark.parametrize("value", ["zero", "0", "-3"])
def test_bad_environment_variable_names_itself(value):
    proc = subprocess.run([sys.executable, "-c", "import linear_moe.kernels"], env={**os.environ, ENV: value},
                          capture_output=True, text=True)
    assert proc.returncode != 0
    assert f"{ENV}={value!r}: expected a positive integer" in proc.stderr
