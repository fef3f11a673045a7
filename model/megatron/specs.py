"""One megatron ``ModuleSpec`` per layer-pattern symbol, and the block spec of a pipeline stage."""
from __future__ import annotations

from typing import Callable

from megatron.core.transformer.spec_utils import ModuleSpec

from linear_moe.model.config import ModelConfig
from linear_moe.model.layer_pattern import LayerKind, parse_layer_pattern
from linear_moe.model.megatron.mixer_adapter import MixerAdapter

#: LayerKind.mixer -> registry name of the mixer for that kind of layer.
MIXER_NAMES: dict[str, Callable[[ModelConfig, str], str]] = {
    "lsm": lambda model_config, attention_mixer: model_config.lsm_mixer,
    "attention": lambda model_config, attention_mixer: attention_mixer,
}

#: LayerKind.ffn -> whether megatron's local layer spec gets routed experts.
FFN_HAS_EXPERTS: dict[str, bool] = {"moe": True, "dense": False}


def layer_spec(kind: LayerKind, model_config: ModelConfig, attention_mixer: str = "attention",
               moe_grouped_gemm: bool = False) -> ModuleSpec:
    """Megatron's local (no Transformer Engine) GPT layer with our mixer in the self-attention slot.

    Dense layers use megatron's SwiGLU ``MLP``; MoE layers its ``MoELayer`` (router, token
    dispatcher, ``SequentialMLP`` experts or ``GroupedMLP`` with ``moe_grouped_gemm``, optional
    shared experts).
    """
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(
        num_experts=model_config.num_experts if FFN_HAS_EXPERTS[kind.ffn] else None,
        moe_grouped_gemm=moe_grouped_gemm,
        normalization="RMSNorm",
    )
    mixer_name = MIXER_NAMES[kind.mixer](model_config, attention_mixer)
    spec.submodules.self_attention = ModuleSpec(
        module=MixerAdapter, params=dict(model_config=model_config, mixer_name=mixer_name)
    )
    return spec


def stage_layers(model_config: ModelConfig, pipeline_size: int, pipeline_rank: int) -> range:
    """Global indices of the layers built on pipeline stage ``pipeline_rank`` (even split)."""
    num_layers = model_config.num_layers
    if num_layers % pipeline_size:
        raise ValueError(f"ModelConfig.num_layers={num_layers} must be divisible by pipeline parallel {pipeline_size}")
    if not 0 <= pipeline_rank < pipeline_size:
        raise ValueError(f"pipeline_rank={pipeline_rank} must be in [0, {pipeline_size})")
    per_stage = num_layers // pipeline_size
    return range(pipeline_rank * per_stage, (pipeline_rank + 1) * per_stage)


def block_spec(model_config: ModelConfig, pipeline_size: int = 1, pipeline_rank: int = 0,
               attention_mixer: str = "attention", moe_grouped_gemm: bool = False):
    """``TransformerBlockSubmodules`` with the specs of this stage's layers and the final RMSNorm."""
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    kinds = parse_layer_pattern(model_config.layer_pattern, model_config.num_layers)
    local = [layer_spec(kinds[i], model_config, attention_mixer, moe_grouped_gemm)
             for i in stage_layers(model_config, pipeline_size, pipeline_rank)]
    final_norm = layer_spec(kinds[-1], model_config, attention_mixer).submodules.input_layernorm
    return TransformerBlockSubmodules(layer_specs=local, layer_norm=final_norm)
