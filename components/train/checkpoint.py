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

import contextlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

from linear_moe.components.files import atomic_write_json

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
        atomic_write_json(partial / STATE_FILE, {**train_state, "step": step})
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
    """Load model (and optimizer) state in place; returns the saved ``train_state``.

    Only a converted checkpoint (``train_state["source"]``, from Hugging Face weights) may lack the
    optimizer state: resuming a training run without it would silently restart Adam's moments.
    """
    from megatron.core import dist_checkpointing

    path = Path(path)
    state = read_train_state(path)
    has_optimizer = (path / "optimizer").is_dir()
    if optimizer is not None and not has_optimizer and "source" not in state:
        raise ValueError(f"checkpoint {path} has no optimizer/ state, so resuming it would restart the optimizer; "
                         "resume an earlier complete step directory")
    with reading_checkpoint(path):
        loaded = dist_checkpointing.load(model_sharded_state_dict(model_chunks), str(path / "model"))
    for i, chunk in enumerate(model_chunks):
        chunk.load_state_dict(loaded[f"chunk{i}"] if len(model_chunks) > 1 else loaded, strict=True)
    if optimizer is not None:
        optimizer.reload_model_params()  # fp32 master copies follow the loaded weights...
        if has_optimizer:  # ...and then the saved state
            with reading_checkpoint(path):
                optimizer.load(path / "optimizer", model_chunks)
    return state


def read_train_state(step: str | Path) -> dict[str, Any]:
    """A step directory's ``train_state.json``; missing or damaged is a ``ValueError`` naming the file."""
    path = Path(step) / STATE_FILE
    if not path.is_file():
        raise ValueError(f"{step} is not a complete checkpoint ({STATE_FILE} missing)")
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot read it ({err}); the checkpoint is damaged: use an earlier complete "
                         "step directory") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(state).__name__}; the checkpoint is damaged")
    return state


@contextlib.contextmanager
def reading_checkpoint(directory: Path) -> Iterator[None]:
    """Report a damaged checkpoint read inside the block as a ``ValueError`` naming ``directory``.

    torch and pickle raise many types for truncated or corrupt files, among them
    ``torch.distributed.checkpoint``'s ``CheckpointException``, which is not an ``Exception``.
    """
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except ValueError:
        raise
    except (Exception, CheckpointException) as err:
        lines = str(err).strip().splitlines()
        raise ValueError(f"checkpoint {directory}: cannot read it ({type(err).__name__}: {lines[-1][:300] if lines else ''}); "
                         "its files are truncated, corrupt or of another model: use an earlier complete step "
                         "directory") from None


def model_sharded_state_dict(model_chunks: list[torch.nn.Module]) -> dict[str, Any]:
    if len(model_chunks) == 1:
        return unwrap_model(model_chunks[0]).sharded_state_dict()
    return {f"chunk{i}": unwrap_model(chunk).sharded_state_dict(prefix="") for i, chunk in enumerate(model_chunks)}


def unwrap_model(module: torch.nn.Module) -> torch.nn.Module:
    while hasattr(module, "module"):
        module = module.module
    return module

