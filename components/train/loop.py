"""The training loop: megatron-core model, schedules and checkpoints.

One code path for CPU (gloo, fp32) and GPU (nccl, bf16): only the backend, the dtypes and, by
choice, the optimizer (``components/train/optim.py``) and the experts' GEMM differ.
"""
from __future__ import annotations

import os
import resource
import time
from pathlib import Path
from typing import Any

import torch

from linear_moe.components.files import atomic_write_json
from linear_moe.components.train import checkpoint as ckpt
from linear_moe.components.train.config import TrainConfig
from linear_moe.components.train.data import build_datasets, check_dataset, microbatches, read_tokenizer_info
from linear_moe.components.train.distributed import init_process_group
from linear_moe.components.train.metrics import MetricsLogger
from linear_moe.components.train.optim import build_optimizer
from linear_moe.components.train.schedule import lr_at
from linear_moe.components.train.step import TrainingModel


def train(config: TrainConfig) -> dict[str, Any]:
    """Train to ``config.steps``; returns the final metrics record (on every rank)."""
    from megatron.core import parallel_state as ps

    from linear_moe.model.megatron import ParallelSizes, destroy_parallel, initialize_parallel

    world = int(os.environ.get("WORLD_SIZE", "1"))
    model_config, tokenizer, latest = preflight(config, world)
    rank, world = init_process_group()
    dp_size = config.data_parallel(world)
    output_dir = Path(config.output_dir)
    checkpoint_root = output_dir / "checkpoints"

    initialize_parallel(ParallelSizes(tensor=config.tensor_parallel, pipeline=config.pipeline_parallel,
                                      expert=config.expert_parallel, context=config.sequence_parallel),
                        seed=config.seed)
    try:
        torch.manual_seed(config.seed)
        model = TrainingModel.from_config(config)
        optimizer = build_optimizer(model.chunks, config)
        start_step = 0
        if latest is not None:
            start_step = ckpt.load_checkpoint(latest, model.chunks, optimizer)["step"]
        dp_rank = ps.get_data_parallel_rank()
        train_ds, valid_ds = build_datasets(
            config.data_dir, seq_length=config.seq_length, seed=config.seed,
            train_samples=config.steps * config.global_batch_size,
            valid_samples=max(1, config.eval_iters) * config.micro_batch_size * dp_size,
            cache_dir=output_dir / "data_cache", tokenizer=tokenizer,
        )
        logger = (MetricsLogger(output_dir, config.dvclive, resume_step=start_step if latest is not None else None)
                  if rank == 0 else None)
        if rank == 0:
            output_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(output_dir / "model_config.json", model_config.to_dict())
            atomic_write_json(output_dir / "train_config.json", config.to_dict())
        record: dict[str, Any] = {}
        eod = tokenizer.eod if config.reset_at_eod else None
        progress = _progress(rank, start_step, config.steps)
        for step in range(start_step, config.steps):
            started = time.perf_counter()
            lr = lr_at(step, lr=config.lr, min_lr=config.min_lr, warmup_steps=config.warmup_steps,
                       total_steps=config.steps)
            optimizer.set_lr(lr)
            batches = microbatches(train_ds, step=step, global_batch_size=config.global_batch_size,
                                   micro_batch_size=config.micro_batch_size, dp_rank=dp_rank, dp_size=dp_size,
                                   eod=eod)
            loss, moe = model.train_step(batches, optimizer)
            elapsed = time.perf_counter() - started
            record = {
                "loss": loss, "lr": lr, "grad_norm": model.last_grad_norm,
                "tokens_per_s": config.global_batch_size * config.seq_length / elapsed,
                "peak_memory_mb": _peak_memory_mb(), **moe,
            }
            done = step + 1
            if config.eval_interval and valid_ds is not None and (done % config.eval_interval == 0 or done == config.steps):
                record["eval_loss"] = model.eval_loss(
                    microbatches(valid_ds, step=0, global_batch_size=config.eval_iters * config.micro_batch_size * dp_size,
                                 micro_batch_size=config.micro_batch_size, dp_rank=dp_rank, dp_size=dp_size, eod=eod))
            if logger is not None and (done % config.log_interval == 0 or done == config.steps):
                logger.log(done, record)
            if progress is not None:
                progress.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}")
                progress.update(1)
            if (config.save_interval and done % config.save_interval == 0) or done == config.steps:
                ckpt.save_checkpoint(checkpoint_root, done, model.chunks, optimizer,
                                     {"model_config": model_config.to_dict(), "train_config": config.to_dict()})
        if progress is not None:
            progress.close()
        if logger is not None:
            logger.close()
        return {"step": config.steps, **record}
    finally:
        destroy_parallel()


class InputError(ValueError):
    """Bad input found before training starts (the CLI prints it and exits 2, with no traceback)."""


def preflight(config: TrainConfig, world_size: int):
    """Every check that needs no process group: parallel sizes, dataset, tokenizer, checkpoint.

    Returns ``(model_config, tokenizer_info, latest_checkpoint_or_None)``; raises :class:`InputError`
    naming the problem before anything is started.
    """
    try:
        return _preflight(config, world_size)
    except InputError:
        raise
    except ValueError as error:
        raise InputError(str(error)) from error


def _preflight(config: TrainConfig, world_size: int):
    config.data_parallel(world_size)
    config.check_runs_here()
    model_config = config.model_config()
    tokenizer = read_tokenizer_info(config.data_dir)
    if tokenizer.vocab_size > model_config.vocab_size:
        raise ValueError(
            f"the tokenizer in {config.data_dir}/tokenizer has {tokenizer.vocab_size} tokens but the model's "
            f"vocab_size is {model_config.vocab_size}; set model_overrides.vocab_size >= {tokenizer.vocab_size} "
            f"(on the command line: --model vocab_size={tokenizer.vocab_size})"
        )
    from linear_moe.components.tokenize import split_prefix

    train_prefix = Path(split_prefix(config.data_dir, "train"))
    train_tokens = check_dataset(train_prefix)
    if config.seq_length + 1 > train_tokens:  # a sample is seq_length inputs plus the last one's label
        raise ValueError(f"seq_length={config.seq_length} needs {config.seq_length + 1} tokens per sample but the "
                         f"training split {train_prefix} holds {train_tokens}; lower seq_length or tokenize more text")
    latest = ckpt.latest_complete(Path(config.output_dir) / "checkpoints")
    if latest is not None and not config.resume:
        raise ValueError(f"output_dir {config.output_dir} already holds checkpoints (latest {latest.name}); pass "
                         f"--resume to continue that run, or choose a new output_dir")
    if latest is not None:
        _check_same_model(ckpt.read_train_state(latest).get("model_config", {}), model_config.to_dict(), latest)
    return model_config, tokenizer, latest


def _check_same_model(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    differing = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if differing:
        details = ", ".join(f"{k}: checkpoint={saved.get(k)!r} vs run={current.get(k)!r}" for k in differing)
        raise ValueError(f"checkpoint {path} was written for a different model config ({details}); "
                         f"use a new output_dir or the checkpoint's config")


def _peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _progress(rank: int, start: int, total: int):
    if rank != 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)
