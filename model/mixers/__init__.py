"""Sequence mixers. Importing this package fills :data:`MIXERS` (name -> class)."""
from linear_moe.model.mixers.base import MIXERS, SINGLE_DEVICE, Linears, Mixer, MixerState, register_mixer

# registration side effects: each module registers its mixer class(es) under their config names
from linear_moe.model.mixers import (  # noqa: E402,F401
    attention,
    based,
    deltanet,
    gla,
    gsa,
    hgrn2,
    lightning,
    linear_attention,
    mamba2,
    mom,
    rebased,
    retention,
    rwkv6,
    rwkv7,
)

__all__ = ["MIXERS", "SINGLE_DEVICE", "Linears", "Mixer", "MixerState", "register_mixer"]
