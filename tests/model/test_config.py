"""ModelConfig validation, JSON round trip, presets and the layer-pattern parser."""
import json

import pytest

from linear_moe.model import ModelConfig, parse_layer_pattern, preset
from linear_moe.model.config import PRESETS


def test_json_round_trip_is_identity():
    config = preset("tiny-hybrid", lsm_mixer="deltanet", moe_capacity_factor=1.25)
    again = ModelConfig.from_json(config.to_json())
    assert again == config
    assert json.loads(config.to_json())["layer_pattern"] == "LLLA"


def test_from_json_reads_a_file(tmp_path):
    path = tmp_path / "model.json"
    path.write_text(preset("tiny").to_json())
    assert ModelConfig.from_json(path) == preset("tiny")


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(layer_pattern="LLL"), "layer_pattern"),  # wrong length (tiny has 2 layers)
        (dict(layer_pattern="LX"), "layer_pattern"),  # unknown symbol
        (dict(num_heads=3), "num_heads"),  # does not divide hidden 64
        (dict(moe_top_k=5), "moe_top_k"),  # more than 4 experts
        (dict(lsm_mixer="not_a_mixer"), "lsm_mixer"),
        (dict(lsm_backend="cuda"), "lsm_backend"),
        (dict(num_kv_heads=3), "num_kv_heads"),
        (dict(moe_capacity_factor=0.0), "moe_capacity_factor"),
        (dict(moe_aux_loss_type="global_aux_loss"), "moe_aux_loss_type: unknown load-balancing loss"),
        (dict(memory_top_k=9), "memory_top_k"),
        (dict(hidden_size=0), "hidden_size: must be positive"),
        (dict(num_kv_heads=-2), "num_kv_heads: must be >= 0"),
        (dict(moe_ffn_hidden_size=0), "moe_ffn_hidden_size: must be positive"),
        (dict(ffn_hidden_size=-64), "ffn_hidden_size: must be >= 0"),
        (dict(norm_eps=-1.0), "norm_eps: must be positive"),
        (dict(state_size=-3), "state_size: must be positive"),
        (dict(rope_theta=0.0), "rope_theta: must be positive"),
        (dict(max_position_embeddings=0), "max_position_embeddings: must be positive"),
        (dict(moe_z_loss_coeff=-1e-3), "moe_z_loss_coeff: must be >= 0"),
    ],
    ids=lambda x: x if isinstance(x, str) else "-".join(f"{k}={v}" for k, v in x.items()),
)
def test_bad_config_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        preset("tiny", **overrides)


def test_unknown_field_is_rejected():
    with pytest.raises(ValueError, match="hidden_sise"):
        ModelConfig.from_dict({**PRESETS["tiny"], "hidden_sise": 3})


def test_pattern_errors_name_the_position():
    with pytest.raises(ValueError, match="position 2"):
        parse_layer_pattern("LLxA")
    with pytest.raises(ValueError, match="num_layers=3"):
        parse_layer_pattern("LLLA", num_layers=3)


def test_pattern_symbols():
    kinds = parse_layer_pattern("LlAa")
    assert [(k.mixer, k.ffn) for k in kinds] == [
        ("lsm", "moe"), ("lsm", "dense"), ("attention", "moe"), ("attention", "dense")
    ]


def test_empty_pattern_defaults_to_all_lsm_moe():
    assert preset("tiny").layer_pattern == "LL"


def test_unknown_preset():
    with pytest.raises(ValueError, match="known presets"):
        preset("A9B-99B")
