"""Layer specs per pattern symbol, pipeline stage split, and the TP tagging of mixer parameters."""
import pytest
import torch
from torch import nn

import linear_moe.model.mixers  # noqa: F401  (fills the mixer registry)
from linear_moe.model import preset
from linear_moe.model.megatron.mixer_adapter import MixerAdapter, tag_mixer_parameters
from linear_moe.model.megatron.specs import block_spec, layer_spec, stage_layers


def test_each_symbol_gets_its_mixer_and_ffn():
    from megatron.core.transformer.mlp import MLP
    from megatron.core.transformer.moe.moe_layer import MoELayer

    mc = preset("tiny", layer_pattern="lLaA", num_layers=4, lsm_mixer="deltanet")
    expected = {"l": ("deltanet", MLP), "L": ("deltanet", MoELayer), "a": ("my_attention", MLP), "A": ("my_attention", MoELayer)}
    for kind, symbol in zip(mc.layer_kinds, mc.layer_pattern):
        spec = layer_spec(kind, mc, attention_mixer="my_attention")
        assert spec.submodules.self_attention.module is MixerAdapter
        assert spec.submodules.self_attention.params["mixer_name"] == expected[symbol][0]
        assert spec.submodules.mlp.module is expected[symbol][1]


def test_pipeline_stages_cover_the_pattern_in_order():
    mc = preset("tiny", layer_pattern="lLaAlL", num_layers=6)
    stages = [stage_layers(mc, 3, rank) for rank in range(3)]
    assert [i for stage in stages for i in stage] == list(range(6))
    assert len(block_spec(mc, 3, 1).layer_specs) == 2
    with pytest.raises(ValueError, match="num_layers=6 must be divisible by pipeline parallel 4"):
        stage_layers(mc, 4, 0)


class _Toy(nn.Module):
    def __init__(self, heads):
        super().__init__()
        self.per_head = nn.Parameter(torch.zeros(heads, 3))
        self.shared = nn.Parameter(torch.zeros(3))


def test_tagging_finds_the_split_dim_of_per_head_parameters():
    local = _Toy(2)
    tag_mixer_parameters(local, dict(_Toy(4).named_parameters()), tp_size=2, sequence_parallel=True)
    assert (local.per_head.tensor_model_parallel, local.per_head.partition_dim) == (True, 0)
    assert (local.shared.tensor_model_parallel, local.shared.sequence_parallel) == (False, True)


def test_tagging_rejects_shapes_that_are_not_a_tp_split():
    with pytest.raises(ValueError, match="local shape \\(3, 3\\) is not full shape \\(4, 3\\) split"):
        tag_mixer_parameters(_Toy(3), dict(_Toy(4).named_parameters()), tp_size=2, sequence_parallel=True)
