"""Parallel layout: the sizes of each parallel dimension, and megatron's process-group setup."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ParallelSizes:
    """Megatron parallel sizes; data parallel is whatever the world size leaves over."""

    tensor: int = 1  # TP: heads, MLP width and vocabulary split over ranks (implies sequence parallel)
    pipeline: int = 1  # PP: the layer pattern split into consecutive stages
    expert: int = 1  # EP: routed experts split over ranks
    expert_tensor: int | None = None  # ETP: each expert's width split over ranks; None = tensor
    context: int = 1  # CP: LASP-2 sequence parallelism, each rank one contiguous chunk of every sample

    def __post_init__(self) -> None:
        if self.expert_tensor is None:
            object.__setattr__(self, "expert_tensor", self.tensor)
        for name in ("tensor", "pipeline", "expert", "expert_tensor", "context"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ParallelSizes.{name} must be a positive int, got {value!r}")
        if self.expert == 1 and self.expert_tensor != self.tensor:
            # megatron marks expert weights for the expert-data-parallel reduction only when EP > 1;
            # with EP == 1 they are reduced over the dense DP group, which misses the other TP ranks.
            raise ValueError(
                f"ParallelSizes.expert_tensor={self.expert_tensor} must equal tensor={self.tensor} when expert=1 "
                "(megatron would not reduce expert gradients over the tensor-parallel ranks)"
            )

    def data_parallel(self, world_size: int) -> int:
        """DP size for ``world_size`` ranks, by megatron's rule (``initialize_model_parallel``).

        The dense grid ``tensor x pipeline x context`` must divide the world; the rest is DP. Routed
        experts lie on their own grid, ``expert x expert_tensor x pipeline``, which must divide it too.
        Errors use the training flags' names (context parallel is our sequence parallel).
        """
        dense_grid = self.tensor * self.pipeline * self.context
        if world_size % dense_grid:
            raise ValueError(
                f"world size {world_size} is not divisible by tensor_parallel={self.tensor} x "
                f"pipeline_parallel={self.pipeline} x sequence_parallel={self.context} = {dense_grid}; "
                f"launch a multiple of {dense_grid} processes or change the sizes"
            )
        data_parallel = world_size // dense_grid
        expert_grid = self.expert * self.expert_tensor * self.pipeline
        if world_size % expert_grid:
            if self.expert_tensor == self.tensor:  # the training flags' case: say it in their terms
                raise ValueError(
                    f"expert_parallel={self.expert} must divide data_parallel x sequence_parallel = "
                    f"{data_parallel * self.context} (world size {world_size}): megatron splits each routed expert "
                    f"over the tensor_parallel={self.tensor} ranks, so expert_parallel x tensor_parallel x "
                    f"pipeline_parallel = {expert_grid} must divide the world size"
                )
            raise ValueError(
                f"expert x expert_tensor x pipeline = {self.expert} x {self.expert_tensor} x {self.pipeline} = "
                f"{expert_grid} must divide the world size {world_size}: megatron lays routed experts out on their "
                f"own grid"
            )
        return data_parallel


def initialize_parallel(sizes: ParallelSizes, seed: int = 1234) -> None:
    """Create megatron's process groups on an initialised ``torch.distributed`` and seed its RNG tracker.

    On a CPU-only host this applies :func:`~linear_moe.model.megatron.cpu_compat.apply_cpu_patches`
    first. Call :func:`destroy_parallel` before initialising again in the same process.
    """
    from megatron.core import parallel_state, tensor_parallel

    from linear_moe.model.megatron.cpu_compat import WITHOUT_TRANSFORMER_ENGINE, apply_cpu_patches

    apply_cpu_patches()
    if torch.cuda.is_available():  # our specs build megatron's torch norms and router GEMM, never TE's
        apply_cpu_patches(WITHOUT_TRANSFORMER_ENGINE, force=True)
    if not torch.distributed.is_initialized():
        raise ValueError("initialize_parallel: call torch.distributed.init_process_group first (gloo on CPU)")
    sizes.data_parallel(torch.distributed.get_world_size())
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=sizes.tensor,
        pipeline_model_parallel_size=sizes.pipeline,
        expert_model_parallel_size=sizes.expert,
        expert_tensor_parallel_size=sizes.expert_tensor,
        context_parallel_size=sizes.context,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy_parallel() -> None:
    """Tear down megatron's process groups (keeps the torch.distributed default group)."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
