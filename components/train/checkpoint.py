"""Checkpoints that survive a kill: megatron ``dist_checkpointing`` for the model, the optimizer in
its own format, all written under ``step_XXXXXXX.partial`` and renamed once every rank has finished.

Layout of one complete checkpoint::

    checkpoints/step_0000100/
        model/                      megatron dist_checkpointing directory (any TP/PP/EP layout)
        optimizer/                  the optimizer's own format (components/train/optim.py): per-rank
                                    safetensors for torch AdamW, dist_checkpointing for megatron's
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
                    optimizer, train_state: dict[str, Any]) -> Path:
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
    dist_checkpointing.save(model_sharded_state_dict(model_chunks), str(partial / "model"))
    optimizer.save(partial / "optimizer", model_chunks)
    dist.barrier()
    if COMMIT_DELAY_ENV in os.environ:  # fault injection for the kill-and-resume test
        time.sleep(float(os.environ[COMMIT_DELAY_ENV]))
    if rank == 0:
        write_json_atomic(partial / STATE_FILE, {**train_state, "step": step})
        previous = final.with_name(final.name + ".old")
        if final.exists():  # a re-save of the same step: move the old one aside, never delete it first
            shutil.rmtree(previous, ignore_errors=True)
            os.replace(final, previous)
        os.replace(partial, final)
        shutil.rmtree(previous, ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(path: str | Path, model_chunks: list[torch.nn.Module],
                    optimizer) -> dict[str, Any]:
    """Load model (and optimizer) state in place; returns the saved ``train_state``."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise ValueError(f"{path} is not a complete checkpoint ({STATE_FILE} missing)")
    loaded = dist_checkpointing.load(model_sharded_state_dict(model_chunks), str(path / "model"))
    for i, chunk in enumerate(model_chunks):
        chunk.load_state_dict(loaded[f"chunk{i}"] if len(model_chunks) > 1 else loaded, strict=True)
    if optimizer is not None:
        optimizer.reload_model_params()  # fp32 master copies follow the loaded weights...
        if (path / "optimizer").is_dir():  # ...and then the saved state (absent in converted HF -> Megatron ones)
            optimizer.load(path / "optimizer", model_chunks)
    return json.loads(state_file.read_text())


def model_sharded_state_dict(model_chunks: list[torch.nn.Module]) -> dict[str, Any]:
    if len(model_chunks) == 1:
        return unwrap_model(model_chunks[0]).sharded_state_dict()
    return {f"chunk{i}": unwrap_model(chunk).sharded_state_dict(prefix="") for i, chunk in enumerate(model_chunks)}


def unwrap_model(module: torch.nn.Module) -> torch.nn.Module:
    while hasattr(module, "module"):
        module = module.module
    return module


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)
