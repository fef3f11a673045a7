"""Process-group setup for ``python -m`` (one process) and ``torchrun`` (many)."""
from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist


def init_process_group() -> tuple[int, int]:
    """Initialise torch.distributed from torchrun's environment, or as a world of one.

    gloo on CPU, nccl on GPU. Returns ``(rank, world_size)``.
    """
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if "RANK" not in os.environ:
        # plain `python -m`: a world of one whose store lives in this process, so no port can clash
        # with another run's, and the environment is left as it was for the next run in this process
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    else:
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


@contextlib.contextmanager
def world_of_one():
    """A world of one process (gloo on CPU, nccl on CUDA) with megatron's groups for TP=PP=EP=SP=1."""
    from linear_moe.model.megatron import ParallelSizes, destroy_parallel, initialize_parallel

    init_process_group()
    try:
        initialize_parallel(ParallelSizes())  # also binds megatron's router GEMM when TE is absent
        try:
            yield
        finally:
            destroy_parallel()
    finally:
        dist.destroy_process_group()
