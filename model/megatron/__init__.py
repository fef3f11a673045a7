"""The Linear-MoE model assembled from megatron-core: config, layer specs, GPT model, sharding, one step.

Runbook (per rank, after ``torch.distributed.init_process_group``)::

    sizes = ParallelSizes(tensor=2)                      # DP = world / (tensor * pipeline)
    initialize_parallel(sizes)                           # applies cpu_compat patches on CPU hosts
    config = transformer_config(model_config, sizes)
    model = build_gpt_model(model_config, config)        # on GPU: .to("cuda", config.params_dtype)
    model = wrap_ddp(model, config)
    # the step (schedule, clipping, AdamW, MoE statistics): components/train/step.py TrainingModel

Importing this package imports megatron-core but patches nothing.
"""
from linear_moe.model.megatron.config import ROUTERS, transformer_config
from linear_moe.model.megatron.gpt import build_gpt_model
from linear_moe.model.megatron.parallel import ParallelSizes, destroy_parallel, initialize_parallel
from linear_moe.model.megatron.specs import block_spec, layer_spec, stage_layers
from linear_moe.model.megatron.state_dict import (
    RankCoords,
    ShardSpec,
    gather_full_state_dict,
    global_key,
    merge_shards,
    shard_layout,
    shard_state_dict,
)
from linear_moe.model.megatron.step import lm_forward_step, masked_mean_loss, wrap_ddp

__all__ = [
    "ROUTERS", "transformer_config", "build_gpt_model", "ParallelSizes", "initialize_parallel", "destroy_parallel",
    "block_spec", "layer_spec", "stage_layers", "RankCoords", "ShardSpec", "gather_full_state_dict", "global_key",
    "merge_shards", "shard_layout", "shard_state_dict", "lm_forward_step", "masked_mean_loss", "wrap_ddp",
]
