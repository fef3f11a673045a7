"""Checkpoints that survive a kill: megatron ``dist_checkpointing`` for the model, safetensors for the
optimizer, all written under ``step_XXXXXXX.partial`` and renamed once every rank has finished.

Layout of one complete checkpoint::

    checkpoints/step_0000100/
        model/                      megatron dist_checkpointing directory (any TP/PP/EP layout)
        optimizer/rank_00000.safetensors + rank_00000.json   per-rank torch optimizer state
        train_state.json            step, configs; written last, before the rename
A directory without ``train_state.json`` or still named ``.partial`` is never taken as complete.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

STEP_DIR = re.compile(r"^step_(\d{7})$")
STATE_FILE = "train_state.json"
#: seconds to wait between writing a checkpoint and committing it (tests kill the run in this window)
COMMIT_DELAY_ENV = "LINEAR_MOE_CHECKPOINT_COMMIT_DELAY_S"


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step:07d}"


def latest_complete(root: str | Path) -> Path | None:
    """The highest-step complete checkpoint under ``root`` (partial ones are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return None
    complete = []
    for child in root.iterdir():
        match = STEP_DIR.match(child.name)
        if match and (child / STATE_FILE).is_file():
            complete.append((int(match.group(1)), child))
    return max(complete)[1] if complete else None


def save_checkpoint(root: str | Path, step: int, model_chunks: list[torch.nn.Module],
                    optimizer: torch.optim.Optimizer, train_state: dict[str, Any]) -> Path:
    """Collective: every rank calls it. Returns the final directory."""
    from megatron.core import dist_checkpointing

    rank = dist.get_rank()
    final = step_dir(root, step)
    partial = final.with_name(final.name + ".partial")
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)  # debris of a killed save
        (partial / "model").mkdir(parents=True)
        (partial / "optimizer").mkdir()
    dist.barrier()
    dist_checkpointing.save(_sharded_state_dict(model_chunks), str(partial / "model"))
    _save_optimizer(optimizer, partial / "optimizer", rank)
    dist.barrier()
    if COMMIT_DELAY_ENV in os.environ:  # fault injection for the kill-and-resume test
        time.sleep(float(os.environ[COMMIT_DELAY_ENV]))
    if rank == 0:
        _write_json_atomic(partial / STATE_FILE, {**train_state, "step": step})
        previous = final.with_name(final.name + ".old")
        if final.exists():  # a re-save of the same step: move the old one aside, never delete it first
            shutil.rmtree(previous, ignore_errors=True)
            os.replace(final, previous)
        os.replace(partial, final)
        shutil.rmtree(previous, ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(path: str | Path, model_chunks: list[torch.nn.Module],
                    optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Load model (and optimizer) state in place; returns the saved ``train_state``."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise ValueError(f"{path} is not a complete checkpoint ({STATE_FILE} missing)")
    loaded = dist_checkpointing.load(_sharded_state_dict(model_chunks), str(path / "model"))
    for i, chunk in enumerate(model_chunks):
        chunk.load_state_dict(loaded[f"chunk{i}"] if len(model_chunks) > 1 else loaded, strict=True)
    if optimizer is not None and (path / "optimizer").is_dir():  # absent in converted HF -> Megatron checkpoints
        _load_optimizer(optimizer, path / "optimizer", dist.get_rank())
    return json.loads(state_file.read_text())


def _sharded_state_dict(model_chunks: list[torch.nn.Module]) -> dict[str, Any]:
    if len(model_chunks) == 1:
        return _unwrap(model_chunks[0]).sharded_state_dict()
    return {f"chunk{i}": _unwrap(chunk).sharded_state_dict(prefix="") for i, chunk in enumerate(model_chunks)}


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    while hasattr(module, "module"):
        module = module.module
    return module


def _save_optimizer(optimizer: torch.optim.Optimizer, directory: Path, rank: int) -> None:
    state = optimizer.state_dict()
    tensors = {f"state.{index}.{name}": value.detach().contiguous().cpu()
               for index, entry in state["state"].items() for name, value in entry.items()
               if isinstance(value, torch.Tensor)}
    scalars = {f"{index}.{name}": value for index, entry in state["state"].items()
               for name, value in entry.items() if not isinstance(value, torch.Tensor)}
    stem = directory / f"rank_{rank:05d}"
    tmp = stem.with_suffix(".safetensors.tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, stem.with_suffix(".safetensors"))
    _write_json_atomic(stem.with_suffix(".json"), {"param_groups": state["param_groups"], "scalars": scalars})


def _load_optimizer(optimizer: torch.optim.Optimizer, directory: Path, rank: int) -> None:
    stem = directory / f"rank_{rank:05d}"
    if not stem.with_suffix(".safetensors").is_file():
        raise ValueError(f"optimizer state {stem}.safetensors is missing: was the checkpoint written with a "
                         f"different number of ranks?")
    tensors = load_file(str(stem.with_suffix(".safetensors")))
    meta = json.loads(stem.with_suffix(".json").read_text())
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for key, value in meta["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)
