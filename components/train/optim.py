"""Optimizers for the trainer, behind one small interface, chosen by ``TrainConfig.optimizer``.

``torch``     torch AdamW. fp32 parameters (the CPU) are stepped in place; any other (bf16 on GPU)
              through an fp32 master copy that is cast back after each step, as megatron's
              mixed-precision optimizer does, so updates below bf16's resolution accumulate instead of
              rounding away. Gradients come from DDP's fp32 ``main_grad`` buffers; the global norm is
              clipped here, counting TP duplicates once. Its state (and the master copies) is saved per
              rank as safetensors.
``megatron``  megatron-core's optimizer (CUDA only, opt-in): fp32 master weights for bf16
              parameters, the distributed optimizer (state sharded over data-parallel ranks) when
              ``TrainConfig.distributed_optimizer``, and megatron's own clipping. Its state is saved
              with ``dist_checkpointing``. On CPU (tests only, through
              ``cpu_compat.megatron_optimizer_on_cpu``) it equals torch AdamW, DP=2 with the
              distributed optimizer equals one process, and a resume is exact. Not the default: its
              one GPU check (tests/gpu/test_train_gpu.py, in a run before two load bugs were fixed)
              failed on an H200 with its traceback lost, so it has yet to pass on a GPU.

Every optimizer has ``set_lr(lr)`` (the schedule calls it before each step), ``zero_grad()``,
``step() -> global grad norm``, ``reload_model_params()`` (after the model's weights were loaded),
and ``save(directory, model_chunks)`` / ``load(directory, model_chunks)``.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from linear_moe.components.files import atomic_write_json
from linear_moe.components.train.checkpoint import model_sharded_state_dict, unwrap_model


class TorchAdamW:
    """torch AdamW; no weight decay on norms, biases and other 1-D parameters; fp32 master weights
    for parameters that are not fp32."""

    def __init__(self, model_chunks: list[torch.nn.Module], config) -> None:
        self.params = [p for chunk in model_chunks for p in chunk.parameters() if p.requires_grad]
        self.masters = [_fp32_master(p) for p in self.params]  # what AdamW steps: the parameter itself if fp32
        self.grad_clip = config.grad_clip
        self.device = self.params[0].device
        decay = [m for m in self.masters if m.ndim >= 2]
        no_decay = [m for m in self.masters if m.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=config.lr, betas=(config.adam_beta1, config.adam_beta2), eps=1e-8)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> float:
        """Take DDP's reduced fp32 ``main_grad``, clip the global norm, step, cast the masters back into
        the model; returns the norm before clipping."""
        for param, master in zip(self.params, self.masters):
            grad = getattr(param, "main_grad", None)
            if grad is None:
                grad = param.grad
            master.grad = None if grad is None else grad.to(master.dtype)
        norm = clip_global_grad_norm([m for m in self.masters if m.grad is not None], self.grad_clip, self.device)
        self.optimizer.step()
        self._copy_masters_to_model()
        return norm

    def reload_model_params(self) -> None:
        """The master copies follow the model's (newly loaded) parameters; :meth:`load` then restores
        the saved masters, which the model's low-precision weights only approximate."""
        with torch.no_grad():
            for param, master in self._master_pairs():
                master.copy_(param)

    def save(self, directory: Path, model_chunks: list[torch.nn.Module]) -> None:
        from safetensors.torch import save_file

        state = self.optimizer.state_dict()
        tensors = {f"state.{index}.{name}": value.detach().contiguous().cpu()
                   for index, entry in state["state"].items() for name, value in entry.items()
                   if isinstance(value, torch.Tensor)}
        tensors.update({f"master.{index}": master.detach().contiguous().cpu()
                        for index, (param, master) in enumerate(zip(self.params, self.masters)) if master is not param})
        scalars = {f"{index}.{name}": value for index, entry in state["state"].items()
                   for name, value in entry.items() if not isinstance(value, torch.Tensor)}
        stem = directory / f"rank_{dist.get_rank():05d}"
        tmp = stem.with_suffix(".safetensors.tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, stem.with_suffix(".safetensors"))
        atomic_write_json(stem.with_suffix(".json"), {"param_groups": state["param_groups"], "scalars": scalars})

    def load(self, directory: Path, model_chunks: list[torch.nn.Module]) -> None:
        from safetensors.torch import load_file

        stem = directory / f"rank_{dist.get_rank():05d}"
        if not stem.with_suffix(".safetensors").is_file():
            raise ValueError(f"optimizer state {stem}.safetensors is missing: was the checkpoint written with a "
                             f"different number of ranks, or by TrainConfig.optimizer='megatron'?")
        state: dict[int, dict[str, Any]] = {}
        masters: dict[int, torch.Tensor] = {}
        for key, value in load_file(str(stem.with_suffix(".safetensors"))).items():
            kind, rest = key.split(".", 1)
            if kind == "master":
                masters[int(rest)] = value
            else:
                index, name = rest.split(".", 1)
                state.setdefault(int(index), {})[name] = value
        meta = json.loads(stem.with_suffix(".json").read_text())
        for key, value in meta["scalars"].items():
            index, name = key.split(".", 1)
            state.setdefault(int(index), {})[name] = value
        self.optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        with torch.no_grad():  # a checkpoint written from fp32 parameters has none: reload_model_params' copies stay
            for index, value in masters.items():
                self.masters[index].copy_(value)
        self._copy_masters_to_model()

    def _master_pairs(self):
        return [(p, m) for p, m in zip(self.params, self.masters) if m is not p]

    def _copy_masters_to_model(self) -> None:
        with torch.no_grad():
            for param, master in self._master_pairs():
                param.copy_(master)


def _fp32_master(param: torch.nn.Parameter) -> torch.Tensor:
    """``param`` itself if fp32, else an fp32 copy carrying the attributes the gradient clip reads
    (tensor-parallel layout, and ``allreduce``: False on expert parameters)."""
    if param.dtype == torch.float32:
        return param
    from megatron.core.tensor_parallel import copy_tensor_model_parallel_attributes

    master = param.detach().clone().float()
    copy_tensor_model_parallel_attributes(master, param)
    for name in ("allreduce", "shared"):
        if hasattr(param, name):
            setattr(master, name, getattr(param, name))
    return master


#: how the distributed optimizer lays out its state in a checkpoint: megatron-core 0.16.1's default,
#: "fully_sharded_model_space", builds flattened ShardedTensors that its own dist_checkpointing rejects
#: ("ShardedTensor.flattened_range is not supported"); "dp_reshardable" saves each rank's buffers as
#: they are (resharding across DP sizes only)
_SHARDING = {"distrib_optim_sharding_type": "dp_reshardable"}


class MegatronAdam:
    """megatron-core's Adam: fp32 main params, optional distributed optimizer, megatron clipping.

    The model chunks must be megatron DDP built with the same ``use_distributed_optimizer``
    (``TrainingModel.build(distributed_optimizer=...)``).
    """

    def __init__(self, model_chunks: list[torch.nn.Module], config) -> None:
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        model_config = unwrap_model(model_chunks[0]).config
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam", lr=config.lr, min_lr=config.min_lr, weight_decay=config.weight_decay,
                adam_beta1=config.adam_beta1, adam_beta2=config.adam_beta2, adam_eps=1e-8,
                clip_grad=config.grad_clip, bf16=model_config.bf16, params_dtype=model_config.params_dtype,
                use_distributed_optimizer=config.distributed_optimizer,
            ),
            model_chunks,
        )
        # megatron's groups carry multipliers (no decay on biases and 1-D params: wd_mult=0) that its
        # OptimizerParamScheduler applies; this trainer owns the schedule, so apply them here
        self.weight_decay = config.weight_decay
        self.set_lr(config.lr)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
            group["weight_decay"] = self.weight_decay * group.get("wd_mult", 1.0)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad()

    def step(self) -> float:
        succeeded, grad_norm, _zeros = self.optimizer.step()
        if not succeeded:  # only loss-scaled fp16 skips steps; bf16 and fp32 never do
            raise RuntimeError("megatron optimizer skipped a step (non-finite gradients)")
        return float(grad_norm) if grad_norm is not None else float("nan")

    def reload_model_params(self) -> None:
        """Copy the model's (newly loaded) parameters into the fp32 main parameters."""
        self.optimizer.reload_model_params()

    def save(self, directory: Path, model_chunks: list[torch.nn.Module]) -> None:
        from megatron.core import dist_checkpointing

        sharded = self.optimizer.sharded_state_dict(model_sharded_state_dict(model_chunks), metadata=_SHARDING)
        dist_checkpointing.save(sharded, str(directory))

    def load(self, directory: Path, model_chunks: list[torch.nn.Module]) -> None:
        from megatron.core import dist_checkpointing

        if not (directory / "metadata.json").is_file():
            raise ValueError(f"{directory} holds no megatron optimizer state: was the checkpoint written by "
                             f"TrainConfig.optimizer='torch'?")
        self._materialise_adam_state()
        sharded = self.optimizer.sharded_state_dict(model_sharded_state_dict(model_chunks), is_loading=True,
                                                    metadata=_SHARDING)
        state = dist_checkpointing.load(sharded, str(directory))
        with torch.no_grad():  # fp32 main params are views of the (grad-requiring) model params
            self.optimizer.load_state_dict(state)
        self._restore_adam_steps()

    # megatron-core 0.16.1 with torch's AdamW (its fallback without Transformer Engine or Apex):
    # DistributedOptimizer.sharded_state_dict(is_loading=True) reads every parameter's Adam ``step``,
    # which torch creates only at the first step, so loading into a fresh optimizer fails; and once
    # the state exists, load_state_dict keeps its per-parameter ``step`` and only the param groups get
    # the saved one. So: zero moments at step 0 before the load, the groups' saved step after it.
    def _torch_optimizers(self) -> list[torch.optim.Optimizer]:
        return [part.optimizer for part in getattr(self.optimizer, "chained_optimizers", [self.optimizer])]

    def _materialise_adam_state(self) -> None:
        for inner in self._torch_optimizers():
            for group in inner.param_groups:
                for param in group["params"]:
                    if not inner.state[param]:
                        inner.state[param].update(exp_avg=torch.zeros_like(param), step=torch.tensor(0.0),
                                                  exp_avg_sq=torch.zeros_like(param))

    def _restore_adam_steps(self) -> None:
        for inner in self._torch_optimizers():
            for group in inner.param_groups:
                if "step" in group:
                    for param in group["params"]:
                        inner.state[param]["step"] = torch.tensor(float(group["step"]))


#: TrainConfig.optimizer -> optimizer class.
OPTIMIZERS: dict[str, Callable[..., Any]] = {"torch": TorchAdamW, "megatron": MegatronAdam}


def build_optimizer(model_chunks: list[torch.nn.Module], config):
    """The optimizer ``config.optimizer`` names, over this rank's DDP-wrapped ``model_chunks``."""
    return OPTIMIZERS[config.optimizer](model_chunks, config)


def clip_global_grad_norm(params: list[torch.nn.Parameter], max_norm: float, device: torch.device) -> float:
    """Global L2 norm over every rank's distinct gradients (TP duplicates counted once); clip in place.

    Dense gradients are summed over the model-parallel group, expert gradients over the expert
    TP x EP x PP group (their DP replicas hold the same reduced values). Returns the norm before clipping.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    dense = torch.zeros(1, dtype=torch.float64, device=device)
    expert = torch.zeros(1, dtype=torch.float64, device=device)
    for param in params:
        if param_is_not_tensor_parallel_duplicate(param):
            target = expert if not getattr(param, "allreduce", True) else dense
            target += param.grad.detach().double().pow(2).sum()
    dist.all_reduce(dense, group=ps.get_model_parallel_group())
    dist.all_reduce(expert, group=ps.get_expert_tensor_model_pipeline_parallel_group())
    norm = math.sqrt(float(dense + expert))
    if max_norm > 0 and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for param in params:
            param.grad.mul_(scale)
    return norm
