"""Process-group setup for ``python -m`` (one process) and ``torchrun`` (many)."""
from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist


def init_process_group() -> tuple[int, int]:
    """Initialise torch.distributed from torchrun's environment, or as a world of one.

    gloo on CPU, nccl on GPU. Returns ``(rank, world_size)``.
    """
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "RANK" not in os.environ:  # plain `python -m`: a world of one on a free local port
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
