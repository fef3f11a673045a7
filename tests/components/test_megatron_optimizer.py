"""``TrainConfig.optimizer='megatron'`` (``optim.MegatronAdam``) on CPU with gloo, proven by equivalence.

megatron-core's optimizer is CUDA-only code; ``cpu_compat.megatron_optimizer_on_cpu`` lets it run on
CPU fp32 tensors without touching its arithmetic (the trainer itself uses torch AdamW on CPU).
References, fp32, relative error:

* world of one: megatron's FP32Optimizer and DistributedOptimizer against torch AdamW through the
  same ``TrainingModel.train_step`` (same decay groups, same clipping), 4 steps: losses and grad norms
  within 1e-6, final weights within 1e-5;
* DP=2 with the distributed optimizer (Adam state sharded over the two ranks, each rank on half the
  batch) against the single-process run (torch AdamW, whole batch on every rank): losses and grad
  norms within 1e-5, final weights within 1e-4 (only the order of sums differs; no load-balancing
  loss, which depends on how the batch is split);
* kill-free resume: save with ``dist_checkpointing`` after 2 steps, load into a fresh model and
  optimizer, 2 more steps equal the uninterrupted run's within 1e-6;
* bf16 parameters (as on a GPU): torch AdamW's fp32 master weights against megatron's
  mixed-precision optimizer (Float16OptimizerWithFloat16Params), 4 steps without clipping: losses
  and parameters within 1e-6 (both step fp32 masters with the same fp32 gradients); with clipping,
  losses within 1e-4 (megatron sums the norm in fp32, we in fp64, and bf16 rounding amplifies the
  difference; stepping the bf16 parameters directly misses by 8e-4). A resume restores the masters:
  2 more steps equal the uninterrupted run's masters exactly, which masters re-derived from the bf16
  weights would miss by up to bf16's resolution.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dist_support import spawn_world
from linear_moe.kernels.testing import assert_rel_close

pytestmark = [pytest.mark.distributed, pytest.mark.xdist_group("dist")]

SEQ_LEN, BATCH, STEPS = 32, 4, 4
MODEL = dict(layer_pattern="LA", num_layers=2, lsm_mixer="gla", moe_aux_loss_coeff=1e-2, moe_z_loss_coeff=1e-3)
#: with each DP rank on half the batch the load-balancing loss (a product of per-rank token fractions)
#: differs from the whole batch's; the per-token z-loss does not, so DP runs keep only that one
DP_MODEL = {**MODEL, "moe_aux_loss_coeff": 0.0}


def _config(model=MODEL, **fields):
    from linear_moe.components.train.config import TrainConfig

    return TrainConfig(**{**dict(preset="tiny", model_overrides=model, lr=3e-3, min_lr=3e-3, grad_clip=0.5, seed=0,
                                 seq_length=SEQ_LEN, micro_batch_size=BATCH, global_batch_size=BATCH), **fields})


def _batches(vocab_size: int) -> list[dict[str, torch.Tensor]]:
    from linear_moe.components.train.data import random_batches

    return random_batches(STEPS, batch_size=BATCH, seq_length=SEQ_LEN, vocab_size=vocab_size,
                          generator=torch.Generator().manual_seed(5))


def _build(config, params_dtype: torch.dtype | None = None):
    from linear_moe.components.train.optim import build_optimizer
    from linear_moe.components.train.step import TrainingModel

    model = TrainingModel.from_config(config, params_dtype=params_dtype)
    return model, build_optimizer(model.chunks, config)


def _train(model, optimizer, batches) -> dict:
    losses, norms = [], []
    for batch in batches:
        optimizer.set_lr(3e-3)
        losses.append(model.train_step([batch], optimizer)[0])
        norms.append(model.last_grad_norm)
    module = model.chunks[0].module
    return dict(losses=torch.tensor(losses, dtype=torch.float64), norms=torch.tensor(norms, dtype=torch.float64),
                params={name: p.detach().clone() for name, p in module.named_parameters()})


def _adam_state_numel(optimizer) -> int:
    """Elements of Adam's first moment held by this rank (all of them, or this rank's shard)."""
    inner = optimizer.optimizer
    parts = getattr(inner, "chained_optimizers", [inner])
    return sum(state["exp_avg"].numel() for part in parts for state in part.optimizer.state.values())


def _rank_batch(batch: dict, rank: int, world: int) -> dict:
    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    return {key: value[rows] for key, value in batch.items()}


def _cases(rank: int, world: int, scratch_dir: str) -> dict:
    from linear_moe.components.train import checkpoint as ckpt

    model_overrides = MODEL if world == 1 else DP_MODEL
    batches = _batches(_config().model_config().vocab_size)
    results = {"reference": _train(*_build(_config(model_overrides, optimizer="torch")), batches)}
    if world == 1:
        for name, distributed in (("fp32_optimizer", False), ("distributed_optimizer", True)):
            model, optimizer = _build(_config(optimizer="megatron", distributed_optimizer=distributed))
            results[name] = _train(model, optimizer, batches)
            results[name]["adam_numel"] = _adam_state_numel(optimizer)
        results["param_numel"] = sum(p.numel() for p in results["reference"]["params"].values())
        return results
    local = [_rank_batch(batch, rank, world) for batch in batches]
    config = _config(model_overrides, optimizer="megatron", distributed_optimizer=True, micro_batch_size=BATCH // world)
    model, optimizer = _build(config)
    results["dp_distributed"] = _train(model, optimizer, local)
    numel = torch.tensor([_adam_state_numel(optimizer)])
    dist.all_reduce(numel)
    results["dp_distributed"]["adam_numel_rank"] = _adam_state_numel(optimizer)
    results["dp_distributed"]["adam_numel_total"] = int(numel)
    # resume: 2 steps, save, 2 steps; then a fresh model + optimizer loads the save and redoes the last 2
    model, optimizer = _build(config)
    _train(model, optimizer, local[:2])
    saved = ckpt.save_checkpoint(os.path.join(scratch_dir, "checkpoints"), 2, model.chunks, optimizer, {})
    results["uninterrupted"] = _train(model, optimizer, local[2:])
    model, optimizer = _build(config)
    ckpt.load_checkpoint(saved, model.chunks, optimizer)
    results["resumed"] = _train(model, optimizer, local[2:])
    return results


def _bf16_cases(rank: int, world: int, scratch_dir: str) -> dict:
    from linear_moe.components.train import checkpoint as ckpt

    batches = _batches(_config().model_config().vocab_size)[:1] * STEPS  # one batch, so the loss falls
    results = {}
    for clip in (0.0, 0.5):
        for optimizer_name in ("torch", "megatron"):
            model, optimizer = _build(_config(optimizer=optimizer_name, distributed_optimizer=False, grad_clip=clip),
                                      torch.bfloat16)
            results[f"{optimizer_name} clip={clip}"] = _train(model, optimizer, batches)
    results["param_dtypes"] = {str(p.dtype) for p in model.parameters()}
    config = _config(optimizer="torch")
    model, optimizer = _build(config, torch.bfloat16)
    _train(model, optimizer, batches[:2])
    saved = ckpt.save_checkpoint(os.path.join(scratch_dir, "checkpoints"), 2, model.chunks, optimizer, {})
    _train(model, optimizer, batches[2:])
    results["uninterrupted_masters"] = [m.clone() for m in optimizer.masters]
    model, optimizer = _build(config, torch.bfloat16)
    ckpt.load_checkpoint(saved, model.chunks, optimizer)
    _train(model, optimizer, batches[2:])
    results["resumed_masters"] = [m.clone() for m in optimizer.masters]
    results["master_dtypes"] = {str(m.dtype) for m in optimizer.masters}
    return results


def _worker(rank: int, scratch_dir: str, cases=_cases) -> dict:
    from linear_moe.model.megatron import ParallelSizes, destroy_parallel, initialize_parallel
    from linear_moe.model.megatron.cpu_compat import megatron_optimizer_on_cpu

    initialize_parallel(ParallelSizes(), seed=0)
    try:
        with megatron_optimizer_on_cpu():
            return cases(rank, dist.get_world_size(), scratch_dir)
    finally:
        destroy_parallel()


def _check_matches(run: dict, reference: dict, loss_ratio: float, param_ratio: float) -> None:
    assert_rel_close("losses", reference["losses"], run["losses"], loss_ratio)
    assert_rel_close("grad norms", reference["norms"], run["norms"], loss_ratio)
    assert set(run["params"]) == set(reference["params"])
    for name, value in reference["params"].items():
        assert_rel_close(name, value, run["params"][name], param_ratio)


def test_megatron_optimizers_match_torch_adamw_in_a_world_of_one():
    results = spawn_world(_worker, nprocs=1)
    reference = results["reference"]
    assert reference["losses"][-1] < reference["losses"][0]
    assert reference["norms"].max() > 0.5, "the clip (0.5) must act for the comparison to cover it"
    for name in ("fp32_optimizer", "distributed_optimizer"):
        _check_matches(results[name], reference, 1e-6, 1e-5)
        assert results[name]["adam_numel"] >= results["param_numel"]  # one rank holds every moment


def test_distributed_optimizer_dp2_matches_single_process_and_shards_its_state():
    results = spawn_world(_worker, nprocs=2)
    run = results["dp_distributed"]
    _check_matches(run, results["reference"], 1e-5, 1e-4)
    # the Adam state is split between the ranks (up to the buffers' padding), not replicated
    assert run["adam_numel_rank"] < 0.6 * run["adam_numel_total"], run
    assert_rel_close("resumed losses", results["uninterrupted"]["losses"], results["resumed"]["losses"], 1e-6)
    for name, value in results["uninterrupted"]["params"].items():
        assert_rel_close(name, value, results["resumed"]["params"][name], 1e-6)


def test_torch_adamw_steps_bf16_parameters_through_fp32_masters_like_megatron():
    results = spawn_world(_worker, (_bf16_cases,), nprocs=1)
    ours, megatron = results["torch clip=0.0"], results["megatron clip=0.0"]
    assert ours["losses"][-1] < ours["losses"][0] - 0.5
    _check_matches(ours, megatron, 1e-6, 1e-6)
    clipped = results["torch clip=0.5"]
    assert clipped["norms"].max() > 0.5, "the clip (0.5) must act"
    assert_rel_close("clipped losses", results["megatron clip=0.5"]["losses"], clipped["losses"], 1e-4)
    for uninterrupted, resumed in zip(results["uninterrupted_masters"], results["resumed_masters"], strict=True):
        assert torch.equal(uninterrupted, resumed)
    assert results["param_dtypes"] == {"torch.bfloat16"} and results["master_dtypes"] == {"torch.float32"}


def test_megatron_optimizer_needs_the_shim_on_cpu():
    """Without ``megatron_optimizer_on_cpu`` megatron's optimizer refuses CPU tensors (why the shim exists)."""
    with pytest.raises(mp.ProcessRaisedException, match=r"torch\.cuda\.FloatTensor|not compiled with CUDA"):
        spawn_world(_worker_without_shim, nprocs=1)


def _worker_without_shim(rank: int, scratch_dir: str) -> None:
    from linear_moe.model.megatron import ParallelSizes, destroy_parallel, initialize_parallel

    initialize_parallel(ParallelSizes(), seed=0)
    try:
        model, optimizer = _build(_config(optimizer="megatron", distributed_optimizer=True))
        _train(model, optimizer, _batches(_config().model_config().vocab_size)[:1])
    finally:
        destroy_parallel()
