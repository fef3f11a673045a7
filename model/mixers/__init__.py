"""Sequence mixers. Importing this package fills :data:`MIXERS` (name -> class)."""
from linear_moe.model.mixers.base import MIXERS, SINGLE_DEVICE, Linears, Mixer, MixerState, register_mixer

__all__ = ["MIXERS", "SINGLE_DEVICE", "Linears", "Mixer", "MixerState", "register_mixer"]
