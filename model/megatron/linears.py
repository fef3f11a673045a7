"""``Linears`` that build megatron tensor-parallel projections, so every mixer runs under TP.

The mixer adapter hands each mixer the *whole* sequence (it gathers the sequence-parallel shards
once and owns the input-gradient reduction), so the column projections here neither gather nor
reduce; the row projection all-reduces its output, and the adapter scatters it back.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from linear_moe.model.mixers.base import Linears


def _plain_output(parallel_linear_cls):
    """Subclass a megatron linear so ``forward`` returns the output tensor instead of ``(out, bias)``."""

    class PlainOutput(parallel_linear_cls):
        def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
            output, bias = super().forward(x)
            return output if bias is None else output + bias

    PlainOutput.__name__ = PlainOutput.__qualname__ = f"{parallel_linear_cls.__name__}Tensor"
    return PlainOutput


class MegatronLinears(Linears):
    """Column/row projections are megatron ``ColumnParallelLinear``/``RowParallelLinear``.

    ``column``: ``(.., in) -> (.., out / tp)``, weight ``(out / tp, in)``, no input gather, no
    input-gradient all-reduce (the adapter does both). ``row``: ``(.., in / tp) -> (.., out)``,
    output all-reduced over TP. ``replicated``: a plain ``nn.Linear`` on every rank.
    """

    def __init__(self, config) -> None:
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        from megatron.core import parallel_state

        self.config = config
        self.tp_size = config.tensor_model_parallel_size
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank() if self.tp_size > 1 else 0
        # The adapter owns sequence parallelism; the projections see the full sequence.
        self._linear_config = copy.copy(config)
        self._linear_config.sequence_parallel = False
        self._column_cls = _plain_output(ColumnParallelLinear)
        self._row_cls = _plain_output(RowParallelLinear)

    def column(self, in_features: int, out_features: int, bias: bool = False) -> nn.Module:
        if out_features % self.tp_size:
            raise ValueError(
                f"column projection of width {out_features} cannot be split over tensor parallel {self.tp_size}"
            )
        return self._column_cls(
            in_features,
            out_features,
            config=self._linear_config,
            init_method=self.config.init_method,
            bias=bias,
            gather_output=False,
            skip_bias_add=False,
            disable_grad_reduce=True,
        )

    def row(self, in_features: int, out_features: int, bias: bool = False) -> nn.Module:
        if in_features % self.tp_size:
            raise ValueError(
                f"row projection of input width {in_features} cannot be split over tensor parallel {self.tp_size}"
            )
        return self._row_cls(
            in_features,
            out_features,
            config=self._linear_config,
            init_method=self.config.output_layer_init_method,
            bias=bias,
            input_is_parallel=True,
            skip_bias_add=False,
        )

    def replicated(self, in_features: int, out_features: int, bias: bool = False) -> nn.Module:
        return nn.Linear(in_features, out_features, bias=bias, dtype=self.config.params_dtype)
