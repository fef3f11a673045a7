"""A bound on Triton's autotuning: at most N configs per autotuned kernel.

fla tunes most of its kernels over tens of configs, compiling each before timing it. On a cold Triton
cache that costs minutes per kernel family (an H200 with fla 0.6.0 and Triton 3.6 spent a whole
15-minute session in it), so a short GPU session bounds it: ``LINEAR_MOE_AUTOTUNE_CONFIGS=N`` keeps,
for every autotuned kernel (``triton.autotune`` and fla's ``fla_cache_autotune`` alike), N of the
configs that survive the kernel's own pruning: those nearest Triton's defaults (4 warps, 3 stages),
in the kernel's own order among equals (fla lists small blocks first, which fit in shared memory).
``N=1`` means no tuning and one compilation per kernel.
Unset, Triton tunes as usual. Timings taken under a bound compare paths that share it (our dispatch
against fla called directly), not the speed a fully tuned kernel reaches.

``import linear_moe.kernels`` applies the variable (every fla call of this project goes through that
package); the Triton interpreter patches (``kernels.triton_cpu``) use ``limit_autotune(1)``.
"""
from __future__ import annotations

import functools
import math
import os

ENV = "LINEAR_MOE_AUTOTUNE_CONFIGS"

_limit: int | None = None


def limit_autotune(max_configs: int | None) -> None:
    """Keep at most ``max_configs`` configs per autotuned kernel from now on (``None``: no bound).

    Process-wide: it patches ``triton.runtime.autotuner.Autotuner.prune_configs`` once, so kernels
    already decorated follow it too (a kernel already tuned for a key keeps its choice).
    """
    global _limit
    if max_configs is not None and (isinstance(max_configs, bool) or not isinstance(max_configs, int)
                                    or max_configs < 1):
        raise ValueError(f"max_configs must be a positive int or None, got {max_configs!r}")
    _install_patch()
    _limit = max_configs


def current_limit() -> int | None:
    return _limit


def limit_autotune_from_env() -> int | None:
    """Apply ``$LINEAR_MOE_AUTOTUNE_CONFIGS`` if set (a positive integer); returns the bound in force."""
    value = os.environ.get(ENV, "").strip()
    if value:
        try:
            limit = int(value)
        except ValueError:
            limit = 0
        if limit < 1:
            raise ValueError(f"{ENV}={value!r}: expected a positive integer (configs kept per autotuned kernel), "
                             f"or unset it to let Triton tune over every config")
        limit_autotune(limit)
    return _limit


def _install_patch() -> None:
    from triton.runtime.autotuner import Autotuner

    if getattr(Autotuner.prune_configs, "_linear_moe_bounded", False):
        return
    original = Autotuner.prune_configs

    @functools.wraps(original)
    def prune_configs(self, kwargs):
        configs = original(self, kwargs)
        return configs if _limit is None else sorted(configs, key=_distance_from_defaults)[:_limit]

    prune_configs._linear_moe_bounded = True
    Autotuner.prune_configs = prune_configs


def _distance_from_defaults(config) -> float:
    """How far a ``triton.Config``'s warps and stages are from Triton's defaults (4 warps, 3 stages)."""
    return abs(math.log2(max(config.num_warps, 1) / 4)) + abs(config.num_stages - 3)
