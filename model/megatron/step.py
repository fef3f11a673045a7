"""Megatron plumbing for a training step: DDP wrapping and the LM ``forward_step_func``.

The step itself (schedule, clipping, optimizer, MoE statistics) is
``linear_moe.components.train.step.TrainingModel``; it works for every layout (TP/SP, PP, EP, DP)
because it goes through megatron's ``get_forward_backward_func`` and ``finalize_model_grads``.
"""
from __future__ import annotations

import functools
import torch


def wrap_ddp(model: torch.nn.Module, config, bucket_size: int | None = None):
    """Wrap one model chunk in megatron DDP and point ``config`` at ``finalize_model_grads``.

    Gradients are reduced in fp32 into ``param.main_grad``; ``TrainingModel.train_step`` hands them to the
    torch optimizer.
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=False, bucket_size=bucket_size
    )
    config.finalize_model_grads_func = finalize_model_grads
    return DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)


def masked_mean_loss(loss_mask_BT: torch.Tensor, per_token_loss_BT: torch.Tensor):
    """Mean of the per-token loss over unmasked tokens; megatron's ``loss_func`` contract."""
    mask = loss_mask_BT.to(per_token_loss_BT.dtype)
    loss = (per_token_loss_BT.float() * mask).sum() / mask.sum().clamp(min=1)
    # clone: megatron divides the returned loss in place by the number of micro-batches
    return loss, {"lm loss": loss.detach().clone()}


def lm_forward_step(data_iterator, model):
    """Megatron ``forward_step_func``; a batch is a dict of ``(B, T)`` ``tokens``, ``labels`` (, ``loss_mask``)."""
    batch = next(data_iterator)
    tokens_BT, labels_BT = batch["tokens"], batch["labels"]
    loss_mask_BT = batch.get("loss_mask")
    if loss_mask_BT is None:
        loss_mask_BT = torch.ones_like(labels_BT, dtype=torch.float32)
    B, T = tokens_BT.shape
    position_ids_BT = torch.arange(T, device=tokens_BT.device).expand(B, T)
    output = model(tokens_BT, position_ids_BT, None, labels=labels_BT)
    return output, functools.partial(masked_mean_loss, loss_mask_BT)
