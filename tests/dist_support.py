"""Spawned gloo worlds for the multi-process CPU tests, with a file rendezvous instead of a TCP port.

A port found free and then handed to the workers can be taken by another test process (``pytest -n``)
before rank 0 binds it; a ``file://`` init method (a ``FileStore`` on a fresh file) has nothing to race
for. Tests import this module as ``dist_support``: ``tests/`` is on ``sys.path`` because it holds the
rootdir ``conftest.py`` (pytest's default ``prepend`` import mode), and spawned workers inherit that path.
"""
from __future__ import annotations

import os
import tempfile
from typing import Any, Callable

import torch
import torch.multiprocessing as mp

RESULT = "result.pt"


def spawn_world(worker: Callable[..., None], args: tuple = (), *, nprocs: int) -> Any:
    """Run ``worker(rank, init_method, out_dir, *args)`` in ``nprocs`` spawned processes; return the result.

    Each rank passes ``init_method`` to ``dist.init_process_group("gloo", init_method=..., rank=rank,
    world_size=nprocs)``. ``out_dir`` is an empty directory that lives as long as the world; the result is
    what a rank saved with :func:`save_result` (loaded with ``weights_only=True``), or ``None`` if none did.
    A failed rank raises here as from ``mp.spawn`` (``ProcessRaisedException`` / ``ProcessExitedException``).
    """
    with tempfile.TemporaryDirectory() as tmp:
        init_method = "file://" + os.path.join(tmp, "rendezvous")  # must not exist yet: one file per world
        out_dir = os.path.join(tmp, "out")
        os.mkdir(out_dir)
        mp.spawn(worker, args=(init_method, out_dir, *args), nprocs=nprocs, join=True)
        path = os.path.join(out_dir, RESULT)
        return torch.load(path, weights_only=True) if os.path.exists(path) else None


def save_result(out_dir: str, result: Any) -> None:
    """Save ``result`` (tensors, numbers, strings, containers of them) for :func:`spawn_world` to return."""
    torch.save(result, os.path.join(out_dir, RESULT))


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
