"""The mixer interface and registry shared by every sequence mixer.

A mixer maps ``x_BTD -> y_BTD`` and carries a recurrent state between calls:

* full-sequence forward, optionally from an initial state, returning the final state;
* packed variable-length sequences through ``cu_seqlens`` (``B == 1``; states have one row per
  sequence, ``N = len(cu_seqlens) - 1``);
* one-token decoding: ``forward(x_B1D, state=..., output_state=True)`` with O(1) state for LSM
  mixers (a KV cache for softmax attention).

The state is a ``dict[str, Tensor]`` whose entries each mixer documents (``"S"`` for the matrix
state ``(N, H, K, V)``, ``"conv"`` for short-conv tails, ...).
"""
from __future__ import annotations

from typing import Callable, TypeVar

import torch
from torch import nn

from linear_moe.model.parallel import active_sequence_parallel

MixerState = dict[str, torch.Tensor]


class Linears:
    """Factory for a mixer's projections; the single-device default builds plain ``nn.Linear``.

    Parallelism lives elsewhere: the Megatron assembly passes a subclass whose ``column`` builds a
    column-parallel linear (output features split over TP ranks, whole heads per rank), ``row`` a
    row-parallel one (input features split, output all-reduced) and ``replicated`` an unsharded one.
    Mixers therefore use separate column projections per head-structured output (q, k, v, gates,
    beta, ...), size per-head parameters with ``local_heads``, and end with one ``row`` projection.
    Every module returned maps ``(..., in) -> (..., out_local)`` and returns a plain tensor.
    """

    tp_size: int = 1
    tp_rank: int = 0  # this rank's index in the TP group: its heads are [tp_rank * local, (tp_rank + 1) * local)

    def local_heads(self, num_heads: int, field: str = "num_heads") -> int:
        if num_heads % self.tp_size:
            raise ValueError(f"ModelConfig.{field}={num_heads} must be divisible by tensor_parallel={self.tp_size}")
        return num_heads // self.tp_size

    def column(self, in_features: int, out_features: int, bias: bool = False) -> nn.Module:
        """``(.., in) -> (.., out / tp)``; ``out`` must be a multiple of whole heads."""
        return nn.Linear(in_features, out_features, bias=bias)

    def row(self, in_features: int, out_features: int, bias: bool = False) -> nn.Module:
        """``(.., in / tp) -> (.., out)``, reduced over TP ranks."""
        return nn.Linear(in_features, out_features, bias=bias)

    def replicated(self, in_features: int, out_features: int, bias: bool = False) -> nn.Module:
        """``(.., in) -> (.., out)`` on every rank (low-rank gates, shared B/C of Mamba2)."""
        return nn.Linear(in_features, out_features, bias=bias)


SINGLE_DEVICE = Linears()

MIXERS: dict[str, type["Mixer"]] = {}

M = TypeVar("M", bound=type["Mixer"])


def register_mixer(name: str) -> Callable[[M], M]:
    """Class decorator: make the mixer available as ``ModelConfig.lsm_mixer == name``."""

    def decorator(cls: M) -> M:
        if name in MIXERS:
            raise ValueError(f"mixer {name!r} registered twice ({MIXERS[name].__name__} and {cls.__name__})")
        MIXERS[name] = cls
        cls.registry_name = name
        return cls

    return decorator


class Mixer(nn.Module):
    """Base class. Subclasses implement ``forward``; ``backend`` selects the kernel path."""

    registry_name: str = ""
    #: recurrence family used by sequence parallelism (see kernels/lasp): identity, fixed_decay,
    #: scalar_decay, diagonal_decay, delta_rule, or "attention"
    family: str = ""

    def __init__(self, config, layer_idx: int = 0, linears: Linears = SINGLE_DEVICE):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.linears = linears
        self.backend = config.lsm_backend  # auto | chunk | naive | fla; tests flip it per instance
        self.register_forward_pre_hook(_reject_state_under_sequence_parallel, with_kwargs=True)

    @classmethod
    def validate_config(cls, config) -> None:
        """Raise ``ValueError`` naming the field if ``config`` cannot build this mixer."""

    @classmethod
    def crosses_layers(cls, config) -> bool:
        """Whether the layers share a tensor within a forward (RWKV7's value residual, see
        :mod:`~linear_moe.model.mixers.value_residual`): the model must run them in one scope."""
        return False

    def forward(
        self,
        x_BTD: torch.Tensor,
        state: MixerState | None = None,
        cu_seqlens: torch.LongTensor | None = None,
        output_state: bool = False,
    ) -> tuple[torch.Tensor, MixerState | None]:
        raise NotImplementedError


def _reject_state_under_sequence_parallel(mixer: Mixer, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook: a recurrent state (decoding) is per sequence, not per SP chunk."""
    if active_sequence_parallel() is None:
        return
    state = kwargs.get("state", args[1] if len(args) > 1 else None)
    output_state = kwargs.get("output_state", args[3] if len(args) > 3 else False)
    if state is not None or output_state:
        raise ValueError(f"mixer {mixer.registry_name!r}: state / output_state (decoding) is not supported under "
                         "sequence parallelism; call the mixer without a SequenceParallelContext to decode")
