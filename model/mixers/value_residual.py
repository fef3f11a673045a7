"""RWKV-7's value residual: the first LSM layer's value ``v_first``, shared with the later layers.

Every later RWKV7 layer mixes its own value toward ``v_first`` token by token (``v <- lerp(v, v_first,
sigmoid(lora(x)))``), so a forward pass carries one tensor across layers besides the hidden states.
The model opens a :func:`value_residual_scope` around its layers (the single-device model in its
forward, the megatron model through a forward hook); the first LSM layer stores its value there and
the later ones read it. It is a per-token quantity, so packed sequences, decoding one token at a time,
tensor parallelism (the same heads on every layer of a rank) and LASP-2 sequence parallelism (the same
chunk on every layer of a rank) need nothing more. Selective recompute re-enters the forward's slot
when it re-runs a mixer. Pipeline stages after the first never see it, and megatron's full activation
recompute re-runs whole layers out of the scope, so those two layouts are refused
(:func:`check_value_residual_layout`).
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import torch


class ValueResidual:
    """The slot one forward pass shares between its layers."""

    def __init__(self) -> None:
        self.v_first: torch.Tensor | None = None


_CURRENT: contextvars.ContextVar[ValueResidual | None] = contextvars.ContextVar("value_residual", default=None)


@contextlib.contextmanager
def value_residual_scope(slot: ValueResidual | None = None) -> Iterator[ValueResidual | None]:
    """A fresh slot for the layers called inside the block (one model forward); or ``slot`` itself, so
    a layer recomputed in the backward pass (selective recompute) reads the slot of its forward."""
    token = _CURRENT.set(ValueResidual() if slot is None else slot)
    try:
        yield _CURRENT.get()
    finally:
        _CURRENT.reset(token)


def current_value_residual() -> ValueResidual | None:
    return _CURRENT.get()


def first_lsm_layer(config) -> int:
    """Index of the layer whose value is ``v_first``: the first LSM layer of the pattern."""
    return next(i for i, kind in enumerate(config.layer_kinds) if not kind.is_attention)


def uses_value_residual(config) -> bool:
    from linear_moe.model.mixers.base import MIXERS

    return MIXERS[config.lsm_mixer].crosses_layers(config)


def check_value_residual_layout(config, *, pipeline_parallel: int, full_recompute: bool) -> None:
    """Raise ``ValueError`` for a parallel layout the value residual cannot run in."""
    if not uses_value_residual(config):
        return
    if pipeline_parallel > 1:
        raise ValueError(f"ModelConfig.value_residual=True ({config.lsm_mixer}'s v_first, carried from the first LSM "
                         f"layer to every later one) needs pipeline_parallel=1, got {pipeline_parallel}: the later "
                         "stages never see it; set value_residual: false to use pipeline parallelism")
    if full_recompute:
        raise ValueError(f"ModelConfig.value_residual=True ({config.lsm_mixer}'s v_first) does not combine with "
                         "recompute='full' (recomputed layers run outside the forward that holds v_first); use "
                         "recompute 'selective' or 'none', or set value_residual: false")
