"""Linear-MoE modeling: config, layer pattern, mixers, MoE and the single-device model."""
from linear_moe.model.config import PRESETS, ModelConfig, preset
from linear_moe.model.layer_pattern import LayerKind, parse_layer_pattern

__all__ = ["ModelConfig", "PRESETS", "preset", "LayerKind", "parse_layer_pattern"]
