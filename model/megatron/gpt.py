"""The Linear-MoE language model as a megatron ``GPTModel`` built from our per-layer specs."""
from __future__ import annotations

import torch

from linear_moe.model.config import ModelConfig
from linear_moe.model.megatron.grouped_gemm import install_gmm
from linear_moe.model.megatron.init import initialize_parameters
from linear_moe.model.megatron.specs import block_spec
from linear_moe.model.mixers.value_residual import (check_value_residual_layout, uses_value_residual,
                                                    value_residual_scope)


def build_gpt_model(model_config: ModelConfig, config, attention_mixer: str = "attention", seed: int = 1234):
    """Build this rank's part of the model (its pipeline stage, its TP/EP shards).

    ``config`` comes from :func:`~linear_moe.model.megatron.config.transformer_config`; megatron's
    process groups must be initialised (:func:`~linear_moe.model.megatron.parallel.initialize_parallel`).
    Positions are the mixers' business (RoPE inside the attention mixer), so the embedding has no
    position table. ``forward(input_ids_BT, position_ids_BT, attention_mask=None, labels=labels_BT)``
    returns the per-token loss ``(B, T)`` on the last stage.

    Parameters are then re-initialised from their global identity (:func:`~linear_moe.model.megatron.init.
    initialize_parameters` with ``seed``), so the gathered initial model is the same for every layout.
    The CPU generator is left as it was. With ``config.moe_grouped_gemm`` the experts are megatron's
    ``GroupedMLP``, whose ``gmm`` op :func:`~linear_moe.model.megatron.grouped_gemm.install_gmm` provides.
    """
    from megatron.core import parallel_state

    pipeline_size = parallel_state.get_pipeline_model_parallel_world_size()
    if model_config.tie_word_embeddings and pipeline_size > 1 and not torch.cuda.is_available():
        # megatron syncs the two copies of a tied embedding with weight.data.cuda()
        raise ValueError("ModelConfig.tie_word_embeddings=True with pipeline parallel > 1 needs CUDA; "
                         "untie the embeddings or use pipeline parallel 1 on CPU")
    check_value_residual_layout(model_config, pipeline_parallel=pipeline_size,
                                full_recompute=config.recompute_granularity == "full")
    pipeline_rank = parallel_state.get_pipeline_model_parallel_rank()
    if config.num_layers != model_config.num_layers:
        raise ValueError(
            f"TransformerConfig.num_layers={config.num_layers} != ModelConfig.num_layers={model_config.num_layers}"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _gpt_model(model_config, config, attention_mixer, pipeline_size, pipeline_rank)
    initialize_parameters(model, model_config, config, seed)
    if uses_value_residual(model_config):
        _value_residual_scope_per_forward(model)
    return model


def _value_residual_scope_per_forward(model: torch.nn.Module) -> None:
    """Megatron runs the layer loop, so forward hooks open RWKV7's v_first scope around each model forward."""
    scopes = []

    def enter(module, args):
        scopes.append(value_residual_scope())
        scopes[-1].__enter__()

    def leave(module, args, output):
        scopes.pop().__exit__(None, None, None)

    model.register_forward_pre_hook(enter)
    model.register_forward_hook(leave, always_call=True)


def _gpt_model(model_config, config, attention_mixer, pipeline_size, pipeline_rank):
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    if config.moe_grouped_gemm:
        install_gmm()  # GroupedMLP needs a gmm op: the grouped_gemm package, or ours
    return GPTModel(
        config=config,
        transformer_layer_spec=block_spec(model_config, pipeline_size, pipeline_rank, attention_mixer,
                                          moe_grouped_gemm=bool(config.moe_grouped_gemm)),
        vocab_size=model_config.vocab_size,
        max_sequence_length=model_config.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=model_config.tie_word_embeddings,
        position_embedding_type="none",
    )
