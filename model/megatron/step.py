"""One optimizer step of the megatron model: DDP wrapping, the LM forward step, forward-backward.

Works for every layout (TP/SP, PP, EP, DP) because it goes through megatron's
``get_forward_backward_func`` schedule and ``finalize_model_grads``. The optimizer is any torch
optimizer over the model's parameters (megatron's own optimizer needs CUDA).
"""
from __future__ import annotations

import functools
from typing import Iterable

import torch


def wrap_ddp(model: torch.nn.Module, config, bucket_size: int | None = None):
    """Wrap one model chunk in megatron DDP and point ``config`` at ``finalize_model_grads``.

    Gradients are reduced in fp32 into ``param.main_grad``; :func:`train_step` hands them to the
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


def train_step(model_chunks: list, optimizer: torch.optim.Optimizer, batches: Iterable[dict], num_microbatches: int,
               seq_length: int, micro_batch_size: int) -> float | None:
    """Forward and backward over ``num_microbatches`` micro-batches, then one optimizer step.

    ``model_chunks``: the DDP-wrapped chunks of this rank. Returns the mean micro-batch loss on the
    last pipeline stage (this rank's data-parallel shard), ``None`` on other stages.
    """
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    for chunk in model_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad(set_to_none=True)
    losses = get_forward_backward_func()(
        forward_step_func=lm_forward_step,
        data_iterator=iter(batches),
        model=model_chunks,
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=False,
    )
    for chunk in model_chunks:
        for param in chunk.parameters():
            main_grad = getattr(param, "main_grad", None)
            if param.requires_grad and main_grad is not None:
                param.grad = main_grad.to(param.dtype)
    optimizer.step()
    if not parallel_state.is_pipeline_last_stage():
        return None
    return float(torch.stack([step["lm loss"] for step in losses]).mean())
