"""The layer pattern: one symbol per layer, parsed and validated here and nowhere else.

Symbols (upper case = MoE feed-forward, lower case = dense SwiGLU MLP):

    L  LSM mixer     + MoE          l  LSM mixer     + dense MLP
    A  softmax attn  + MoE          a  softmax attn  + dense MLP

Example: ``"LLLA" * 3`` is a 12-layer hybrid with softmax attention every fourth layer,
all with MoE.  Every consumer (the single-device model, the Megatron assembly, pipeline
parameter checks) calls :func:`parse_layer_pattern`.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LayerKind:
    """What one layer is made of."""

    mixer: str  # "lsm" or "attention"
    ffn: str  # "moe" or "dense"

    @property
    def is_moe(self) -> bool:
        return self.ffn == "moe"

    @property
    def is_attention(self) -> bool:
        return self.mixer == "attention"


LAYER_SYMBOLS: dict[str, LayerKind] = {
    "L": LayerKind("lsm", "moe"),
    "l": LayerKind("lsm", "dense"),
    "A": LayerKind("attention", "moe"),
    "a": LayerKind("attention", "dense"),
}


def parse_layer_pattern(pattern: str, num_layers: int | None = None) -> list[LayerKind]:
    """Parse ``pattern`` into one :class:`LayerKind` per layer.

    Raises ``ValueError`` naming the position of an unknown symbol, or the lengths when
    ``num_layers`` is given and differs from ``len(pattern)``.
    """
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"layer_pattern must be a non-empty string of {sorted(LAYER_SYMBOLS)}, got {pattern!r}")
    kinds = []
    for position, symbol in enumerate(pattern):
        if symbol not in LAYER_SYMBOLS:
            raise ValueError(
                f"layer_pattern {pattern!r}: unknown symbol {symbol!r} at position {position}; "
                f"use one of {''.join(LAYER_SYMBOLS)} (upper case = MoE, lower case = dense MLP)"
            )
        kinds.append(LAYER_SYMBOLS[symbol])
    if num_layers is not None and len(pattern) != num_layers:
        raise ValueError(
            f"layer_pattern {pattern!r} has {len(pattern)} symbols but num_layers={num_layers}; "
            f"give one symbol per layer, or set num_layers={len(pattern)} (train CLI: --model num_layers={len(pattern)})"
        )
    return kinds
