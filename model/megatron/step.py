"""Megatron plumbing for a training step: DDP wrapping and the LM ``forward_step_func``.

The step itself (schedule, clipping, optimizer, MoE statistics) is
``linear_moe.components.train.step.TrainingModel``; it works for every layout (TP/SP, PP, EP, DP)
because it goes through megatron's ``get_forward_backward_func`` and ``finalize_model_grads``.
"""
from __future__ import annotations

import functools
import torch


def wrap_ddp(model: torch.nn.Module, config, bucket_size: int | None = None, use_distributed_optimizer: bool = False):
    """Wrap one model chunk in megatron DDP and point ``config`` at ``finalize_model_grads``.

    Gradients are reduced in fp32 into ``param.main_grad`` (all-reduced, or reduce-scattered for
    megatron's distributed optimizer), where the optimizers of ``components/train/optim.py`` read them.
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=use_distributed_optimizer,
        bucket_size=bucket_size,
    )
    config.finalize_model_grads_func = finalize_model_grads
    return DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)


def masked_mean_loss(loss_mask_BT: torch.Tensor, per_token_loss_BT: torch.Tensor, cp_group=None):
    """Mean of the per-token loss over unmasked tokens; megatron's ``loss_func`` contract.

    Under context parallelism (``cp_group`` of size > 1; tensors are this rank's sequence chunk)
    the mean is over the tokens of every chunk: ``local sum / global count``. Megatron multiplies
    the returned loss by the CP size and DDP averages gradients over DP x CP, so the gradients are
    those of the global mean; the reported value is the global mean itself.
    """
    mask = loss_mask_BT.to(per_token_loss_BT.dtype)
    local_sum = (per_token_loss_BT.float() * mask).sum()
    stats = torch.stack([local_sum.detach(), mask.sum().float()])
    if cp_group is not None and torch.distributed.get_world_size(cp_group) > 1:
        torch.distributed.all_reduce(stats, group=cp_group)
    loss = local_sum / stats[1].clamp(min=1)
    # a new tensor: megatron scales the returned loss in place (CP size, number of micro-batches)
    return loss, {"lm loss": stats[0] / stats[1].clamp(min=1)}


def context_parallel_chunk(x_BT: torch.Tensor) -> torch.Tensor:
    """This context-parallel rank's contiguous chunk ``(B, T / CP)`` of a ``(B, T)`` batch tensor."""
    from megatron.core import parallel_state

    cp_size = parallel_state.get_context_parallel_world_size()
    if cp_size == 1:
        return x_BT
    T = x_BT.shape[1]
    if T % cp_size:
        raise ValueError(f"sequence length {T} must be divisible by the sequence-parallel size {cp_size}")
    t_local = T // cp_size
    start = parallel_state.get_context_parallel_rank() * t_local
    return x_BT[:, start:start + t_local]


def document_offsets(tokens_BT: torch.Tensor, eod: int) -> torch.Tensor:
    """Start offsets of the documents in the ``(1, B*T)`` concatenation of a batch, plus its end:
    ``cu_seqlens (N + 1,)`` int64, as the mixers take them. A document starts at every sample start
    and after every ``eod`` token (the EOD ends the document before it)."""
    B, T = tokens_BT.shape
    after_eod = (tokens_BT[:, :-1] == eod).nonzero()  # (n, 2): sample b, position p -> next starts at p + 1
    starts = torch.cat([torch.arange(0, B * T, T, device=tokens_BT.device),
                        after_eod[:, 0] * T + after_eod[:, 1] + 1,
                        torch.tensor([B * T], device=tokens_BT.device)])
    return torch.unique(starts)  # sorted, int64


def lm_forward_step(data_iterator, model):
    """Megatron ``forward_step_func``; a batch is a dict of ``(B, T)`` ``tokens``, ``labels`` (, ``loss_mask``),
    and optionally ``cu_seqlens`` (:func:`document_offsets`).

    With ``cu_seqlens`` the batch runs as one packed ``(1, B*T)`` sequence whose documents do not see
    each other: every mixer restarts its state (and attention its causal window and RoPE positions)
    at each document start. Under context (LASP-2 sequence) parallelism every tensor is cut to this
    rank's contiguous chunk; the offsets stay global and documents may cross rank boundaries.
    """
    from megatron.core import parallel_state
    from megatron.core.packed_seq_params import PackedSeqParams

    batch = next(data_iterator)
    tokens_BT, labels_BT = batch["tokens"], batch["labels"]
    loss_mask_BT = batch.get("loss_mask")
    if loss_mask_BT is None:
        loss_mask_BT = torch.ones_like(labels_BT, dtype=torch.float32)
    cu_seqlens = batch.get("cu_seqlens")
    packed_seq_params = None
    if cu_seqlens is not None:
        tokens_BT, labels_BT, loss_mask_BT = (x.reshape(1, -1) for x in (tokens_BT, labels_BT, loss_mask_BT))
        # our mixers read the offsets alone; max_seqlen (for Transformer Engine) would cost a device sync
        packed_seq_params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens)
    B, T = tokens_BT.shape
    position_ids_BT = torch.arange(T, device=tokens_BT.device).expand(B, T)
    tokens_BT, labels_BT, loss_mask_BT, position_ids_BT = (
        context_parallel_chunk(x) for x in (tokens_BT, labels_BT, loss_mask_BT, position_ids_BT))
    output = model(tokens_BT, position_ids_BT, None, labels=labels_BT, packed_seq_params=packed_seq_params)
    cp_size = parallel_state.get_context_parallel_world_size()
    cp_group = parallel_state.get_context_parallel_group() if cp_size > 1 else None
    return output, functools.partial(masked_mean_loss, loss_mask_BT, cp_group=cp_group)
