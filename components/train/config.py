"""``TrainConfig``: every knob of a training run, validated in one place.

The model architecture is a :class:`linear_moe.model.ModelConfig` (a preset plus overrides); this
holds data, optimisation, parallelism, checkpointing and logging.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from linear_moe.components.train.optim import OPTIMIZERS
from linear_moe.model import ModelConfig, preset
from linear_moe.model.field_types import check_dataclass_types
from linear_moe.model.mixers.value_residual import check_value_residual_layout


RECOMPUTE_MODES = ("none", "full", "selective")


@dataclass
class TrainConfig:
    # --- model ---
    preset: str = "tiny"  # a name in linear_moe.model.config.PRESETS
    model_overrides: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields over the preset

    # --- data ---
    data_dir: str = ""  # tokenize output: indexed dataset prefixes + tokenizer/
    seq_length: int = 128  # tokens per sample
    micro_batch_size: int = 4  # samples per micro-batch per data-parallel rank
    global_batch_size: int = 8  # samples per optimizer step across data-parallel ranks
    reset_at_eod: bool = False  # documents packed into a sample don't see each other: states restart after EOD

    # --- optimisation ---
    steps: int = 100  # optimizer steps
    lr: float = 3e-3  # peak learning rate
    min_lr: float = 3e-4  # floor of the cosine decay
    warmup_steps: int = 10  # linear warmup steps
    weight_decay: float = 0.1  # AdamW decoupled weight decay
    adam_beta1: float = 0.9  # AdamW beta1
    adam_beta2: float = 0.95  # AdamW beta2
    grad_clip: float = 1.0  # global gradient-norm clip (0 disables)
    optimizer: str = "torch"  # torch (AdamW; fp32 masters for bf16) | megatron (CUDA only; distributed optimizer)
    distributed_optimizer: bool = True  # megatron optimizer only: shard its state over data-parallel ranks
    seed: int = 1234  # model init, data order

    # --- parallelism (world size = tp * pp * sp * dp, with ep dividing dp * sp: megatron's expert grid) ---
    tensor_parallel: int = 1  # tensor-parallel size
    pipeline_parallel: int = 1  # pipeline-parallel size
    expert_parallel: int = 1  # expert-parallel size (experts sharded over dp x sp ranks, each split over tp)
    sequence_parallel: int = 1  # LASP-2 sequence parallelism (megatron's context-parallel group) size
    recompute: str = "none"  # none | full (whole layers) | selective (each layer's sequence mixer, from its input)
    moe_grouped_gemm: bool = False  # megatron's grouped-GEMM experts (bf16 only, so GPU) instead of one MLP per expert

    # --- evaluation, checkpoints, logs ---
    eval_interval: int = 50  # steps between validation-loss evaluations (0 disables)
    eval_iters: int = 4  # micro-batches per validation evaluation
    save_interval: int = 50  # steps between checkpoints (0: only the final one)
    output_dir: str = "runs/train"  # checkpoints/, metrics.jsonl, dvclive/
    resume: bool = False  # continue from the latest complete checkpoint in output_dir
    log_interval: int = 1  # steps between metric records
    dvclive: bool = True  # also log through dvclive

    def __post_init__(self) -> None:
        check_dataclass_types(self)  # "32" for an int, "no" for a bool: an error naming the field
        positive = ("seq_length", "micro_batch_size", "global_batch_size", "steps", "tensor_parallel",
                    "pipeline_parallel", "expert_parallel", "sequence_parallel", "log_interval")
        for name in positive:
            _check(getattr(self, name) > 0, name, f"must be positive, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_interval", "eval_iters", "save_interval"):
            _check(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        _check(self.lr > 0 and 0 <= self.min_lr <= self.lr, "min_lr",
               f"need 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        _check(self.grad_clip >= 0, "grad_clip", f"must be >= 0, got {self.grad_clip}")
        _check(self.seq_length % self.sequence_parallel == 0, "sequence_parallel",
               f"sequence_parallel={self.sequence_parallel} must divide seq_length={self.seq_length}: each SP rank "
               "holds one contiguous chunk of every sample")
        _check(self.eval_iters > 0 or self.eval_interval == 0, "eval_iters",
               f"must be positive when eval_interval={self.eval_interval} > 0 (set eval_interval: 0 to disable)")
        _check(self.optimizer in OPTIMIZERS, "optimizer", f"{self.optimizer!r} not in {tuple(OPTIMIZERS)}")
        _check(self.recompute in RECOMPUTE_MODES, "recompute", f"{self.recompute!r} not in {RECOMPUTE_MODES}")
        model = self.model_config()  # validates the model fields
        check_value_residual_layout(model, pipeline_parallel=self.pipeline_parallel,
                                    full_recompute=self.recompute == "full")
        _check(not (self.reset_at_eod and self.micro_batch_size > 1 and model.has_moe and model.moe_aux_loss_coeff > 0
                    and model.moe_aux_loss_type == "seq_aux_loss"), "reset_at_eod",
               f"runs each micro-batch as one packed sequence, so moe_aux_loss_type='seq_aux_loss' would balance "
               f"the {self.micro_batch_size} samples of a micro-batch together, not each sequence; use "
               "micro_batch_size: 1, reset_at_eod: false, or the model field moe_aux_loss_type: aux_loss")

    def model_config(self) -> ModelConfig:
        return preset(self.preset, **self.model_overrides)

    def data_parallel(self, world_size: int) -> int:
        """Data-parallel size for ``world_size`` processes, with a clear error if it doesn't divide."""
        dp = data_parallel_size(world_size, tensor_parallel=self.tensor_parallel,
                                pipeline_parallel=self.pipeline_parallel, expert_parallel=self.expert_parallel,
                                sequence_parallel=self.sequence_parallel)
        if self.global_batch_size % (self.micro_batch_size * dp):
            raise ValueError(
                f"global_batch_size={self.global_batch_size} must be a multiple of micro_batch_size="
                f"{self.micro_batch_size} x data_parallel={dp}"
            )
        return dp

    def check_runs_here(self) -> None:
        """The checks that depend on this machine: the GPU-only options need CUDA. (A config is also
        written on a CPU for a GPU cluster, so ``__post_init__`` cannot make them.)"""
        if torch.cuda.is_available():
            return
        if self.optimizer == "megatron":
            raise ValueError("TrainConfig.optimizer='megatron' needs CUDA (megatron-core's optimizer is CUDA-only); "
                             "use optimizer: torch (--optimizer torch) on CPU")
        if self.moe_grouped_gemm:
            raise ValueError("TrainConfig.moe_grouped_gemm=True needs bf16 parameters, which this trainer uses on GPUs "
                             "only (megatron's GroupedMLP asserts bf16); drop --moe-grouped-gemm on CPU")

    def uses_distributed_optimizer(self) -> bool:
        """Whether DDP must lay out its buffers for megatron's distributed optimizer."""
        return self.distributed_optimizer and self.optimizer == "megatron"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"TrainConfig: unknown field(s) {unknown}; known: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | Path) -> "TrainConfig":
        """Read a JSON or YAML file holding TrainConfig fields."""
        import yaml

        path = Path(path)
        if not path.is_file():
            raise ValueError(f"training config file {path} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
            data = (yaml.safe_load(text) or {}) if path.suffix in (".yaml", ".yml") else json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as err:
            raise ValueError(f"training config file {path} is not valid {path.suffix.lstrip('.').upper() or 'JSON'}: "
                             f"{str(err).splitlines()[0]}; fix its syntax") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of TrainConfig fields, got {type(data).__name__}")
        return cls.from_dict(data)


def data_parallel_size(world_size: int, *, tensor_parallel: int, pipeline_parallel: int, expert_parallel: int,
                       sequence_parallel: int) -> int:
    """Data parallel for ``world_size`` processes under these sizes; raises if they do not tile it.

    The rule is megatron's, kept in one place: :meth:`~linear_moe.model.megatron.parallel.ParallelSizes.data_parallel`
    (experts split over the tensor-parallel ranks, so ``expert_parallel`` must divide ``dp * sp``).
    """
    from linear_moe.model.megatron.parallel import ParallelSizes

    return ParallelSizes(tensor=tensor_parallel, pipeline=pipeline_parallel, expert=expert_parallel,
                         context=sequence_parallel).data_parallel(world_size)


def _check(condition: bool, field_name: str, message: str) -> None:
    if not condition:
        raise ValueError(f"TrainConfig.{field_name}: {message}")
