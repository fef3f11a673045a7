"""The GPU training path: megatron's optimizer (fp32 master weights, distributed optimizer), bf16,
activation recompute and checkpoint resume, each against an independent reference run on the same GPU.

Skipped without CUDA (CI is CPU-only); run on a GPU machine with
``python -m pytest -q tests/gpu`` (``benchmarks/gpu_suite.sh`` does). The model is the tiny preset
with an ``LA`` MoE hybrid (GLA through fla's Triton kernels, softmax attention, MoE on both layers).
Tolerances are relative errors on the per-step losses:

* fp32, megatron optimizer (distributed) vs torch AdamW: 1e-4 (the same AdamW arithmetic; fla's
  backward kernels may sum in a different order between runs);
* bf16 parameters with fp32 master weights vs the fp32 run: 3e-2 over 6 steps;
* recompute=full vs none, resume vs uninterrupted, and the default torch AdamW (fp32 masters) vs
  megatron's optimizer, in bf16 without clipping: 1e-3.
"""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SEQ_LEN, BATCH, STEPS = 256, 4, 6
MODEL = dict(layer_pattern="LA", num_layers=2, lsm_mixer="gla", moe_aux_loss_coeff=1e-2)


@pytest.fixture
def world():
    from linear_moe.components.train.distributed import world_of_one

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    with world_of_one():
        yield


def _config(**fields):
    from linear_moe.components.train.config import TrainConfig

    return TrainConfig(preset="tiny", model_overrides=MODEL, lr=3e-3, min_lr=3e-3, warmup_steps=0, seed=0,
                       seq_length=SEQ_LEN, micro_batch_size=BATCH, global_batch_size=BATCH, **fields)


def _batches(vocab_size: int, steps: int) -> list[dict[str, torch.Tensor]]:
    """One random batch, repeated: the model memorises it, so the loss must fall (on fresh uniformly
    random tokens it cannot go below ln(vocab), and whether it moves down is noise)."""
    from linear_moe.components.train.data import random_batches

    (batch,) = random_batches(1, batch_size=BATCH, seq_length=SEQ_LEN, vocab_size=vocab_size,
                              generator=torch.Generator().manual_seed(3))
    return [batch] * steps


def _build(config, params_dtype):
    from linear_moe.components.train.optim import build_optimizer
    from linear_moe.components.train.step import TrainingModel

    model = TrainingModel.from_config(config, params_dtype=params_dtype)
    return model, build_optimizer(model.chunks, config)


def _run(model, optimizer, batches) -> torch.Tensor:
    losses = []
    for batch in batches:
        optimizer.set_lr(3e-3)
        losses.append(model.train_step([batch], optimizer)[0])
    return torch.tensor(losses, dtype=torch.float64)


def _rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


def test_megatron_optimizer_matches_torch_adamw_in_fp32(world):
    from linear_moe.components.train.optim import MegatronAdam, TorchAdamW

    batches = _batches(_config().model_config().vocab_size, STEPS)
    reference_model, reference_opt = _build(_config(optimizer="torch"), torch.float32)
    assert isinstance(reference_opt, TorchAdamW)
    reference = _run(reference_model, reference_opt, batches)
    model, optimizer = _build(_config(optimizer="megatron", distributed_optimizer=True), torch.float32)
    assert isinstance(optimizer, MegatronAdam)
    losses = _run(model, optimizer, batches)
    assert reference[-1] < reference[0] - 0.1, reference  # it learns, so "matches" means something
    assert _rel(losses, reference) <= 1e-4, (losses, reference)


def test_bf16_with_distributed_optimizer_tracks_fp32(world):
    batches = _batches(_config().model_config().vocab_size, STEPS)
    reference = _run(*_build(_config(optimizer="torch"), torch.float32), batches)
    model, optimizer = _build(_config(optimizer="megatron", distributed_optimizer=True), torch.bfloat16)
    assert model.config.bf16 and all(p.dtype == torch.bfloat16 for p in model.parameters())
    losses = _run(model, optimizer, batches)
    assert _rel(losses, reference) <= 3e-2, (losses, reference)
    assert losses[-1] < losses[0] - 0.1, losses


def test_default_torch_adamw_in_bf16_matches_megatron_mixed_precision(world):
    batches = _batches(_config().model_config().vocab_size, STEPS)
    reference = _run(*_build(_config(optimizer="megatron", distributed_optimizer=False, grad_clip=0.0),
                             torch.bfloat16), batches)
    losses = _run(*_build(_config(optimizer="torch", grad_clip=0.0), torch.bfloat16), batches)
    assert _rel(losses, reference) <= 1e-3, (losses, reference)
    assert losses[-1] < losses[0] - 0.1, losses


def test_full_recompute_matches_no_recompute_in_bf16(world):
    batches = _batches(_config().model_config().vocab_size, 3)
    reference = _run(*_build(_config(optimizer="megatron"), torch.bfloat16), batches)
    losses = _run(*_build(_config(optimizer="megatron", recompute="full"), torch.bfloat16), batches)
    assert _rel(losses, reference) <= 1e-3, (losses, reference)


def test_megatron_optimizer_checkpoint_resumes(world, tmp_path):
    from linear_moe.components.train import checkpoint as ckpt

    batches = _batches(_config().model_config().vocab_size, 4)
    config = _config(optimizer="megatron", distributed_optimizer=True)
    model, optimizer = _build(config, torch.bfloat16)
    _run(model, optimizer, batches[:2])
    saved = ckpt.save_checkpoint(tmp_path, 2, model.chunks, optimizer, {"model_config": {}})
    uninterrupted = _run(model, optimizer, batches[2:])
    del model, optimizer
    model, optimizer = _build(config, torch.bfloat16)
    assert ckpt.load_checkpoint(saved, model.chunks, optimizer)["step"] == 2
    resumed = _run(model, optimizer, batches[2:])
    assert _rel(resumed, uninterrupted) <= 1e-3, (resumed, uninterrupted)
