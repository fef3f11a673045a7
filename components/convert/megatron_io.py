"""The megatron side of the converter: a world of one, the full model, dist checkpoints in and out.

Dist checkpoints are layout-independent: whatever TP/PP/EP layout wrote one, ``dist_checkpointing``
reshards it into the model built here with TP = PP = EP = 1, and a checkpoint saved from that model
loads into any layout.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist

from linear_moe.components.train.checkpoint import STATE_FILE, latest_complete, read_train_state, reading_checkpoint
from linear_moe.model.config import ModelConfig

MODEL_DIR = "model"  # the dist_checkpointing directory inside a step directory


@contextlib.contextmanager
def single_process_megatron() -> Iterator[None]:
    """A gloo world of one (in-process store) with megatron's groups at TP = PP = EP = 1; torn down after."""
    from megatron.core import parallel_state

    from linear_moe.model.megatron.parallel import ParallelSizes, destroy_parallel, initialize_parallel

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    elif dist.get_world_size() != 1:
        raise ValueError(f"the converter runs in one process, but torch.distributed has world size "
                         f"{dist.get_world_size()}; run it outside torchrun")
    if parallel_state.model_parallel_is_initialized():
        raise ValueError("megatron's parallel state is already initialised in this process; "
                         "call destroy_parallel() before converting")
    try:
        initialize_parallel(ParallelSizes())
        yield
    finally:
        destroy_parallel()
        if created:
            dist.destroy_process_group()


def build_full_model(model_config: ModelConfig) -> torch.nn.Module:
    """The megatron ``GPTModel`` at TP = PP = EP = 1, fp32 (inside :func:`single_process_megatron`)."""
    from linear_moe.model.megatron.config import transformer_config
    from linear_moe.model.megatron.gpt import build_gpt_model

    return build_gpt_model(model_config, transformer_config(model_config, params_dtype=torch.float32))


def tensor_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` without ``_extra_state`` and other non-tensor entries."""
    return {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def resolve_checkpoint(path: str | Path) -> Path:
    """A step directory (``model/`` + ``train_state.json``); a train output dir or checkpoints root
    resolves to its latest complete checkpoint."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        step = path
    else:
        step = next((c for c in (latest_complete(path), latest_complete(path / "checkpoints")) if c), None)
        if step is None:
            raise ValueError(f"checkpoint {path}: no complete checkpoint found; give a step directory holding "
                             f"{STATE_FILE} and {MODEL_DIR}/, or a train output dir with "
                             "checkpoints/step_XXXXXXX/ (directories without train_state.json are incomplete)")
    if not (step / MODEL_DIR / "metadata.json").is_file():
        raise ValueError(f"checkpoint {step}: {MODEL_DIR}/metadata.json is missing; it is not a megatron "
                         "dist_checkpointing checkpoint written by the train step")
    return step


def read_model_config(step: Path) -> ModelConfig:
    """The ``model_config`` recorded in a step directory's ``train_state.json``."""
    path = Path(step) / STATE_FILE
    state = read_train_state(step)
    if not isinstance(state.get("model_config"), dict):
        raise ValueError(f"{path} has no 'model_config' mapping; it was not written by the train step")
    try:
        return ModelConfig.from_dict(state["model_config"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: invalid model_config ({err})") from None


def check_checkpoint_shapes(model: torch.nn.Module, checkpoint_dir: Path) -> None:
    """Compare the checkpoint's tensor metadata with what ``model`` will request, naming each mismatch.

    Keys and global shapes are megatron's sharded ones (layers stacked in the first dim).
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    saved = dist_checkpointing.load_tensors_metadata(str(checkpoint_dir))
    problems = []
    for entry in nested_values(model.sharded_state_dict()):
        if not isinstance(entry, ShardedTensor):
            continue  # factories (fused GLU) and objects are checked by megatron on load
        if entry.key not in saved:
            problems.append(f"missing {entry.key!r}")
        elif tuple(saved[entry.key].global_shape) != tuple(entry.global_shape):
            problems.append(f"{entry.key!r} has shape {tuple(saved[entry.key].global_shape)} in the checkpoint, "
                            f"the model config expects {tuple(entry.global_shape)}")
    if problems:
        shown = "; ".join(sorted(set(problems))[:8])
        raise ValueError(f"checkpoint {checkpoint_dir} does not match its model_config: {shown}")


def load_dist_checkpoint(model: torch.nn.Module, checkpoint_dir: Path) -> None:
    """Load a dist_checkpointing directory (any layout) into ``model`` in place."""
    from megatron.core import dist_checkpointing

    with reading_checkpoint(checkpoint_dir):
        check_checkpoint_shapes(model, checkpoint_dir)
        loaded = dist_checkpointing.load(model.sharded_state_dict(), str(checkpoint_dir))
    model.load_state_dict(loaded, strict=True)


def save_dist_checkpoint(model: torch.nn.Module, checkpoint_dir: Path) -> None:
    """Write ``model``'s sharded state dict as a dist_checkpointing directory (must be empty)."""
    from megatron.core import dist_checkpointing

    Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(model.sharded_state_dict(), str(checkpoint_dir))


@torch.no_grad()
def assign_tensors(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy a full megatron state dict (tensor entries, names/shapes checked) into ``model``."""
    from linear_moe.components.convert.adapter import check_names_and_shapes

    current = tensor_state_dict(model)
    check_names_and_shapes({k: v.shape for k, v in current.items()}, tensors, "megatron model")
    for key, target in current.items():
        target.copy_(tensors[key])
