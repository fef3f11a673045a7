"""``ModelConfig`` -> megatron ``TransformerConfig``: the one place where our fields meet megatron's."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from linear_moe.model.config import ModelConfig
from linear_moe.model.megatron.parallel import ParallelSizes

#: ModelConfig.moe_router -> megatron router fields.
ROUTERS: dict[str, dict[str, Any]] = {
    # softmax over all experts, then top-k (weights not renormalised)
    "softmax_topk": dict(moe_router_score_function="softmax", moe_router_pre_softmax=True),
    # top-k logits, then softmax over the k (renormalised top-k)
    "mixtral": dict(moe_router_score_function="softmax", moe_router_pre_softmax=False),
    # DeepSeek-V3 aux-loss-free: sigmoid scores, a balancing bias that only affects selection
    "sigmoid_bias": dict(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True),
}

#: (ModelConfig field, ParallelSizes field) pairs where the first must be a multiple of the second.
_DIVISIBLE_BY = (
    ("num_heads", "tensor"), ("num_kv_heads", "tensor"), ("vocab_size", "tensor"), ("num_layers", "pipeline"),
)

#: recompute option -> megatron activation-recomputation fields.
RECOMPUTE: dict[str | None, dict[str, Any]] = {
    None: dict(recompute_granularity=None),
    "full": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    "selective": dict(recompute_granularity="selective"),
}


def transformer_config(
    model_config: ModelConfig,
    parallel: ParallelSizes = ParallelSizes(),
    *,
    params_dtype: torch.dtype | None = None,
    recompute: str | None = None,
    moe_grouped_gemm: bool = False,
    **overrides: Any,
):
    """Build the megatron ``TransformerConfig`` for ``model_config`` under ``parallel``.

    fp32 on CPU, bf16 on GPU unless ``params_dtype`` says otherwise. ``moe_grouped_gemm`` picks
    megatron's grouped-GEMM experts (``GroupedMLP``) over the per-expert ``SequentialMLP``; both have
    the same full state dict, init and HF export. It is opt-in (``TrainConfig.moe_grouped_gemm``): it
    matches ``SequentialMLP`` on CPU, and on an H200 in bf16 (README, Known limits). GroupedMLP needs ``bf16=True`` (megatron asserts it in the
    forward); CPU tests pass ``bf16=True`` as an override with fp32 ``params_dtype``.
    Capacity dropping keeps each expert's highest-weight assignments ("probs"), as the single-device
    ``model/moe`` does, so trained and exported models drop the same tokens. (megatron's "position"
    policy takes ``torch.topk`` of a 0/1 map, whose ties come back in no defined order.)
    Sequence parallelism is on whenever ``parallel.tensor > 1``: megatron's MoE requires it with TP,
    and the mixer adapter relies on it to sum the gradients of TP-replicated mixer parameters.
    ``overrides`` go to ``TransformerConfig`` last (e.g. ``moe_token_dispatcher_type="allgather"``).
    """
    from megatron.core.transformer import TransformerConfig

    mc = model_config
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute={recompute!r}: use one of {list(RECOMPUTE)}")
    for field, dim in _DIVISIBLE_BY:
        _check_divisible(mc, field, getattr(mc, field), dim, getattr(parallel, dim))
    on_gpu = torch.cuda.is_available()
    if params_dtype is None:
        params_dtype = torch.bfloat16 if on_gpu else torch.float32
    if mc.has_moe:
        _check_divisible(mc, "num_experts", mc.num_experts, "expert", parallel.expert)
    fields: dict[str, Any] = dict(
        # trunk
        num_layers=mc.num_layers,
        hidden_size=mc.hidden_size,
        num_attention_heads=mc.num_heads,
        num_query_groups=mc.num_kv_heads,
        kv_channels=mc.head_dim,
        ffn_hidden_size=mc.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=mc.norm_eps,
        gated_linear_unit=True,  # SwiGLU
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=mc.initializer_range,
        # parallelism
        tensor_model_parallel_size=parallel.tensor,
        pipeline_model_parallel_size=parallel.pipeline,
        expert_model_parallel_size=parallel.expert,
        expert_tensor_parallel_size=parallel.expert_tensor,
        context_parallel_size=parallel.context,  # LASP-2 over megatron's context-parallel group
        sequence_parallel=parallel.tensor > 1,
        # precision and device
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        use_cpu_initialization=not on_gpu,
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        # layers differ (LSM/attention, MoE/dense): checkpoint each under its own key, not stacked
        hetereogenous_dist_checkpoint=True,
        **RECOMPUTE[recompute],
    )
    if mc.has_moe:
        fields.update(
            num_moe_experts=mc.num_experts,
            moe_router_topk=mc.moe_top_k,
            moe_ffn_hidden_size=mc.moe_ffn_hidden_size,
            moe_shared_expert_intermediate_size=(
                mc.num_shared_experts * mc.moe_ffn_hidden_size if mc.num_shared_experts else None
            ),
            moe_shared_expert_gate=mc.shared_expert_gate and mc.num_shared_experts > 0,
            moe_aux_loss_coeff=mc.moe_aux_loss_coeff,
            moe_router_load_balancing_type=mc.moe_aux_loss_type if mc.moe_aux_loss_coeff > 0 else "none",
            moe_z_loss_coeff=mc.moe_z_loss_coeff or None,
            moe_expert_capacity_factor=mc.moe_capacity_factor,
            moe_token_drop_policy="probs",  # what model/moe/experts.dispatch does
            moe_router_bias_update_rate=mc.moe_bias_update_rate,
            moe_token_dispatcher_type="alltoall",
            moe_grouped_gemm=moe_grouped_gemm,
            moe_router_dtype="fp32",
            **ROUTERS[mc.moe_router],
        )
    fields.update(overrides)
    if fields.get("moe_grouped_gemm") and not fields["bf16"]:
        raise ValueError(
            f"moe_grouped_gemm=True needs bf16=True (megatron's GroupedMLP asserts config.bf16), but "
            f"params_dtype={params_dtype} gives bf16=False; use bf16 parameters, or pass bf16=True as an override"
        )
    return TransformerConfig(**fields)




def _check_divisible(mc: ModelConfig, field: str, value: int, dim: str, size: int) -> None:
    if value % size:
        raise ValueError(f"ModelConfig.{field}={value} must be divisible by {dim} parallel {size}")
