"""One training step on the megatron model: forward-backward schedule, then the optimizer step,
plus the MoE statistics (aux losses, per-expert load) the trainer logs."""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

#: ModelConfig.moe_aux_loss_type -> the name megatron's loss tracker gives that load-balancing loss
TRACKED_BALANCE_LOSS = {"aux_loss": "load_balancing_loss", "seq_aux_loss": "seq_load_balancing_loss"}


class TrainingModel:
    """This rank's DDP-wrapped model chunk(s) and the step functions that drive them."""

    def __init__(self, model_config, config, chunks: list, *, seq_length: int, micro_batch_size: int):
        """``config``: the megatron TransformerConfig; ``chunks``: this rank's DDP-wrapped model chunk(s)."""
        self.model_config = model_config
        self.config = config
        self.chunks = chunks
        self.device = next(chunks[0].parameters()).device
        self.seq_length = seq_length
        self.micro_batch_size = micro_batch_size
        self.last_grad_norm = float("nan")
        self._tokens_per_expert: dict[int, torch.Tensor] = {}
        self._watch_routers()

    @classmethod
    def build(cls, model_config, *, seq_length: int, micro_batch_size: int, recompute: str = "none",
              seed: int = 1234, distributed_optimizer: bool = False, params_dtype: torch.dtype | None = None,
              moe_grouped_gemm: bool = False) -> "TrainingModel":
        """Build this rank's part of the model under megatron's initialised process groups.

        As megatron's ``get_model`` does: on GPU every module moves to the device in ``params_dtype``
        (bf16 unless given) inside a ``Float16Module``; DDP reduces gradients in fp32 and, with
        ``distributed_optimizer``, lays its buffers out for megatron's distributed optimizer.
        """
        from megatron.core import parallel_state as ps
        from megatron.core.transformer.module import Float16Module

        from linear_moe.model.megatron import ParallelSizes, build_gpt_model, transformer_config, wrap_ddp

        sizes = ParallelSizes(tensor=ps.get_tensor_model_parallel_world_size(),
                              pipeline=ps.get_pipeline_model_parallel_world_size(),
                              expert=ps.get_expert_model_parallel_world_size(),
                              context=ps.get_context_parallel_world_size())
        config = transformer_config(model_config, sizes, params_dtype=params_dtype, moe_grouped_gemm=moe_grouped_gemm,
                                    recompute=None if recompute == "none" else recompute)
        model = build_gpt_model(model_config, config, seed=seed)
        if torch.cuda.is_available():
            model = model.to(device=torch.device("cuda", torch.cuda.current_device()), dtype=config.params_dtype)
        if config.bf16:
            model = Float16Module(config, model)
        chunk = wrap_ddp(model, config, use_distributed_optimizer=distributed_optimizer)
        return cls(model_config, config, [chunk], seq_length=seq_length, micro_batch_size=micro_batch_size)

    @classmethod
    def from_config(cls, config, params_dtype: torch.dtype | None = None) -> "TrainingModel":
        """The trainer's model for a ``TrainConfig``: every field that shapes the build comes from it."""
        return cls.build(config.model_config(), seq_length=config.seq_length, micro_batch_size=config.micro_batch_size,
                         recompute=config.recompute, seed=config.seed, params_dtype=params_dtype,
                         distributed_optimizer=config.uses_distributed_optimizer(),
                         moe_grouped_gemm=config.moe_grouped_gemm)

    def parameters(self):
        for chunk in self.chunks:
            yield from chunk.parameters()

    # ------------------------------------------------------------------ steps
    def train_step(self, batches: list[dict[str, torch.Tensor]], optimizer) -> tuple[float, dict[str, Any]]:
        """Forward/backward over ``batches`` (this rank's micro-batches), then ``optimizer.step()``.

        ``optimizer`` is one of :mod:`~linear_moe.components.train.optim` (it clips and records the
        global grad norm in ``self.last_grad_norm``). Returns the global mean loss and the MoE
        statistics, identical on every rank.
        """
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

        for chunk in self.chunks:
            chunk.train()
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        self._tokens_per_expert.clear()
        # emptied, not zeroed (megatron's clear_aux_losses_tracker): the tracker is process-wide, and an
        # entry left by another model keeps that model's reduce group
        get_moe_layer_wise_logging_tracker().clear()
        losses = self._schedule(batches, forward_only=False)
        self.last_grad_norm = optimizer.step()
        return self._global_mean(losses), self._moe_stats(len(batches))

    @torch.no_grad()
    def eval_loss(self, batches: list[dict[str, torch.Tensor]]) -> float:
        for chunk in self.chunks:
            chunk.eval()
        return self._global_mean(self._schedule(batches, forward_only=True))

    # ------------------------------------------------------------------ internals
    def _schedule(self, batches, forward_only: bool):
        from megatron.core.pipeline_parallel import get_forward_backward_func
        from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

        from linear_moe.model.megatron import lm_forward_step

        # megatron keeps the MoE aux-loss gradient scale in a class attribute, which the schedule
        # copy_()s a (1,) tensor into; a backward outside a schedule (another model's, an evaluation's)
        # leaves a 0-d one there that the copy cannot broadcast into. The schedule sets it afresh.
        MoEAuxLossAutoScaler.main_loss_backward_scale = None
        batches = [{key: value.to(self.device, non_blocking=True) for key, value in batch.items()} for batch in batches]
        return get_forward_backward_func()(
            forward_step_func=lm_forward_step, data_iterator=iter(batches), model=self.chunks,
            num_microbatches=len(batches), seq_length=self.seq_length, micro_batch_size=self.micro_batch_size,
            forward_only=forward_only,
        )

    def _global_mean(self, losses: list[dict[str, torch.Tensor]]) -> float:
        """Mean micro-batch loss over data-parallel ranks, broadcast from the last pipeline stage."""
        from megatron.core import parallel_state as ps

        value = torch.zeros(2, dtype=torch.float64, device=self.device)
        if ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0 and losses:
            value[0] = torch.stack([item["lm loss"].double() for item in losses]).mean()
            value[1] = 1.0
        dist.all_reduce(value)
        return float(value[0] / value[1])

    def _watch_routers(self) -> None:
        """Record each router's per-expert token counts during the training forward."""
        from megatron.core.transformer.moe.router import TopKRouter

        for chunk in self.chunks:
            for module in chunk.modules():
                if isinstance(module, TopKRouter):
                    module.register_forward_hook(self._count_tokens)

    def _count_tokens(self, router, _inputs, output) -> None:
        if not torch.is_grad_enabled():
            return
        routing_map = output[1]
        counts = routing_map.sum(dim=0).detach().double()
        key = router.layer_number
        self._tokens_per_expert[key] = self._tokens_per_expert.get(key, 0) + counts

    def _moe_stats(self, num_microbatches: int) -> dict[str, Any]:
        """Router losses and per-expert load of the last step, identical on every rank.

        ``load_balancing_loss`` (of either ``moe_aux_loss_type``) / ``z_loss``: megatron's tracked
        router losses (before their coefficients), mean over MoE layers and micro-batches;
        ``expert_load``: per MoE layer, the fraction of routed tokens each expert received (global
        over all ranks).
        """
        from megatron.core import parallel_state as ps
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

        moe_layers = [i + 1 for i, kind in enumerate(self.model_config.layer_kinds) if kind.is_moe]
        if not moe_layers:
            return {}
        tracker = get_moe_layer_wise_logging_tracker()
        metrics = self._tracked_router_losses()  # from the config: the same list on every rank
        losses = torch.zeros(len(metrics), dtype=torch.float64, device=self.device)
        for row, name in enumerate(metrics):
            if name not in tracker:  # a pipeline stage without MoE layers logs nothing: its share is 0
                continue
            values = tracker[name]["values"].detach().double().clone()
            if tracker[name].get("reduce_group") is not None:
                # a load-balancing loss is tracked as per-rank shares over its group (TP x CP tokens)
                dist.all_reduce(values, group=tracker[name]["reduce_group"])
            losses[row] = values.sum().to(self.device)
        counts = torch.zeros(len(moe_layers), self.model_config.num_experts, dtype=torch.float64, device=self.device)
        for row, layer_number in enumerate(moe_layers):
            if layer_number in self._tokens_per_expert:
                counts[row] = self._tokens_per_expert[layer_number].to(self.device)
        # each TP rank routes its sequence-parallel shard and each stage its layers: sum every rank's
        # counts; a loss is tracked once per (stage, layer) and, its shares summed above, replicated
        # over TP x CP x DP ranks
        payload = torch.cat([counts.flatten(), losses])
        dist.all_reduce(payload)
        counts = payload[: counts.numel()].view_as(counts)
        replicas = dist.get_world_size() // ps.get_pipeline_model_parallel_world_size()
        losses = payload[counts.numel():] / (replicas * num_microbatches * len(moe_layers))
        fractions = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
        stats = {metric: float(value) for metric, value in zip(metrics.values(), losses.cpu())}
        return {**stats, "expert_load": fractions.cpu().tolist()}

    def _tracked_router_losses(self) -> dict[str, str]:
        """megatron tracker name -> metric name of each router loss this model trains with."""
        config = self.model_config
        losses = {}
        if config.moe_aux_loss_coeff > 0:
            losses[TRACKED_BALANCE_LOSS[config.moe_aux_loss_type]] = "load_balancing_loss"
        if config.moe_z_loss_coeff > 0:
            losses["z_loss"] = "z_loss"
        return losses
