"""Spawned gloo worlds for the multi-process CPU tests, with a file rendezvous instead of a TCP port.

A port found free and then handed to the workers can be taken by another test process (``pytest -n``)
before rank 0 binds it; a ``file://`` init method (a ``FileStore`` on a fresh file) has nothing to race
for. Tests import this module as ``dist_support``: ``tests/`` is on ``sys.path`` because it holds the
rootdir ``conftest.py`` (pytest's default ``prepend`` import mode), and spawned workers inherit that path.
"""
from __future__ import annotations

import datetime
import os
import tempfile
import warnings
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

RESULT = "result.pt"


def spawn_world(worker: Callable[..., Any], args: tuple = (), *, nprocs: int, timeout_s: float = 120) -> Any:
    """Run ``worker(rank, scratch_dir, *args)`` on ``nprocs`` spawned gloo ranks; return rank 0's return value.

    Each rank joins the default process group (gloo, a file rendezvous, collectives timing out after
    ``timeout_s``) before the call and leaves it after, with one intra-op thread and warnings silenced.
    ``scratch_dir`` is an empty directory the ranks share for the world's lifetime. Rank 0's return value
    (tensors, numbers, strings, containers of them) comes back through ``torch.save`` / ``torch.load(...,
    weights_only=True)``. A failed rank raises here as from ``mp.spawn`` (``ProcessRaisedException`` /
    ``ProcessExitedException``).
    """
    with tempfile.TemporaryDirectory() as tmp:
        init_method = "file://" + os.path.join(tmp, "rendezvous")  # must not exist yet: one file per world
        scratch_dir = os.path.join(tmp, "scratch")
        os.mkdir(scratch_dir)
        mp.spawn(_rank_main, args=(worker, init_method, tmp, scratch_dir, nprocs, timeout_s, args), nprocs=nprocs,
                 join=True)
        path = os.path.join(tmp, RESULT)
        return torch.load(path, weights_only=True) if os.path.exists(path) else None


def _rank_main(rank: int, worker: Callable[..., Any], init_method: str, tmp: str, scratch_dir: str, nprocs: int,
               timeout_s: float, args: tuple) -> None:
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=nprocs,
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        result = worker(rank, scratch_dir, *args)
        if rank == 0:
            torch.save(result, os.path.join(tmp, RESULT))
    finally:
        dist.destroy_process_group()


class FullView:
    """One rank's shard of a megatron model, read and written as the single-process model's full tensors.

    ``full_state`` (full-model names and shapes, e.g. another layout's gathered initial state) is loaded
    into this rank's shards first, when given. :meth:`state` and :meth:`grads` gather back over the
    model's TP / EP / PP groups (collective: every rank calls them).
    """

    def __init__(self, module: torch.nn.Module, model_config, full_state: dict | None = None):
        from linear_moe.model.megatron.state_dict import RankCoords, shard_layout, shard_state_dict

        self.module = module
        self.layout = shard_layout(module)
        self.coords = RankCoords.current(model_config.num_layers, model_config.num_experts)
        if full_state is not None:
            local = shard_state_dict(full_state, self.layout, self.coords)
            missing, unexpected = module.load_state_dict(local, strict=False)
            assert not unexpected and all(key.endswith("_extra_state") for key in missing), (missing, unexpected)

    def state(self) -> dict:
        return self._gather({k: v for k, v in self.module.state_dict().items() if k in self.layout})

    def grads(self) -> dict:
        return self._gather({n: p.grad.clone() for n, p in self.module.named_parameters() if p.grad is not None})

    def _gather(self, local: dict) -> dict:
        from linear_moe.model.megatron.state_dict import gather_full_state_dict

        return gather_full_state_dict(local, self.layout, self.coords)
