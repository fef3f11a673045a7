"""Delta-family mixers (deltanet, gated_deltanet, rwkv7): chunked kernels vs the naive recurrence,
state carry-over, packed sequences and token-by-token decoding against full-sequence runs."""
import pytest
import torch

import linear_moe.model.mixers.deltanet  # noqa: F401  (registers deltanet, gated_deltanet)
import linear_moe.model.mixers.rwkv7  # noqa: F401  (registers rwkv7)
from linear_moe.kernels.testing import assert_rel_close
from linear_moe.model.config import preset
from linear_moe.model.mixers import MIXERS

MIXER_CASES = [
    pytest.param("deltanet", {}, id="deltanet"),
    pytest.param("deltanet", {"conv_size": 0}, id="deltanet-noconv"),
    pytest.param("gated_deltanet", {}, id="gated_deltanet"),
    # a layer after the first mixes toward v_first, which only a model forward provides: the mixer-level
    # cases check the recurrence; the value residual is checked in the model (tests below, test_modeling.py)
    pytest.param("rwkv7", {"value_residual": False}, id="rwkv7"),
]


def build(name, overrides, layer_idx=1):
    config = preset("tiny", lsm_mixer=name, **overrides)  # chunk_size 16, D 64, 4 heads
    return MIXERS[name](config, layer_idx=layer_idx)


def forward_and_grads(mixer, x, backend, **kw):
    mixer.backend = backend
    mixer.zero_grad()
    y, state = mixer(x, output_state=True, **kw)
    gen = torch.Generator().manual_seed(1)
    loss = (y * torch.randn(y.shape, generator=gen)).sum() + (state["S"] * torch.randn(state["S"].shape, generator=gen)).sum()
    loss.backward()
    return y.detach(), state, {n: p.grad.clone() for n, p in mixer.named_parameters()}


@pytest.mark.parametrize("name, overrides", MIXER_CASES)
def test_chunk_matches_naive_forward_and_param_grads(name, overrides):
    mixer = build(name, overrides)
    x = torch.randn(2, 37, 64)  # T = 37 is not a multiple of chunk_size 16
    y_ref, s_ref, g_ref = forward_and_grads(mixer, x, "naive")
    y, s, grads = forward_and_grads(mixer, x, "chunk")
    assert_rel_close("y", y_ref, y, 1e-4)
    assert_rel_close("S", s_ref["S"], s["S"], 1e-4)
    assert g_ref, "mixer has no parameters"
    for n in g_ref:
        assert_rel_close(f"grad {n}", g_ref[n], grads[n], 1e-4)


@pytest.mark.parametrize("name, overrides", MIXER_CASES)
def test_state_carry_matches_full_sequence(name, overrides):
    """Two calls chained through the returned state equal one call over the whole sequence."""
    mixer = build(name, overrides)
    mixer.backend = "chunk"
    x = torch.randn(2, 29, 64)
    with torch.no_grad():
        y_full, s_full = mixer(x, output_state=True)
        y1, s1 = mixer(x[:, :13], output_state=True)
        y2, s2 = mixer(x[:, 13:], state=s1, output_state=True)
    assert_rel_close("y", y_full, torch.cat([y1, y2], dim=1), 1e-5)
    for key in s_full:
        assert_rel_close(f"state[{key}]", s_full[key], s2[key], 1e-5)


@pytest.mark.parametrize("name, overrides", MIXER_CASES)
def test_packed_varlen_matches_separate_runs(name, overrides):
    mixer = build(name, overrides)
    mixer.backend = "chunk"
    lengths = [9, 20, 3]
    cu = torch.tensor([0, 9, 29, 32])
    docs = [torch.randn(1, n, 64) for n in lengths]
    with torch.no_grad():
        y_packed, s_packed = mixer(torch.cat(docs, dim=1), cu_seqlens=cu, output_state=True)
        for i, doc in enumerate(docs):
            y_i, s_i = mixer(doc, output_state=True)
            assert_rel_close(f"y[{i}]", y_i, y_packed[:, cu[i] : cu[i + 1]], 1e-5)
            for key in s_i:
                assert_rel_close(f"state[{key}][{i}]", s_i[key], s_packed[key][i : i + 1], 1e-5)


@pytest.mark.parametrize("name, overrides", MIXER_CASES)
def test_token_by_token_decoding_matches_full_forward(name, overrides):
    mixer = build(name, overrides)
    mixer.backend = "chunk"
    x = torch.randn(2, 21, 64)
    with torch.no_grad():
        y_full, s_full = mixer(x, output_state=True)
        y_prefix, state = mixer(x[:, :5], output_state=True)
        steps = [y_prefix]
        for t in range(5, x.shape[1]):
            y_t, state = mixer(x[:, t : t + 1], state=state, output_state=True)
            steps.append(y_t)
    assert_rel_close("y", y_full, torch.cat(steps, dim=1), 1e-5)
    assert_rel_close("S", s_full["S"], state["S"], 1e-5)


def test_rwkv7_rejects_different_key_and_value_widths():
    with pytest.raises(ValueError, match="expand_v"):
        preset("tiny", lsm_mixer="rwkv7", expand_v=2.0)


def _rwkv7_model(value_residual: bool):
    from linear_moe.model.modeling import LinearMoEConfig, LinearMoEForCausalLM

    config = preset("tiny", lsm_mixer="rwkv7", layer_pattern="ll", num_layers=2, value_residual=value_residual)
    torch.manual_seed(0)
    model = LinearMoEForCausalLM(LinearMoEConfig.from_model_config(config))
    with torch.no_grad():  # layer 0 writes nothing to the residual stream: only v_first links it to the loss
        model.model.layers[0].mixer.o_proj.weight.zero_()
    return model


@pytest.mark.parametrize("value_residual", [True, False])
def test_rwkv7_value_residual_carries_layer_0_value_to_layer_1(value_residual):
    """With layer 0's output projection zeroed, its value projection reaches the loss only through
    layer 1's lerp toward v_first: a gradient with the value residual, exactly none without it."""
    model = _rwkv7_model(value_residual)
    tokens = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(1))
    model(tokens, labels=tokens).lm_loss.backward()
    v_proj = model.model.layers[0].mixer.v_proj.weight.grad
    assert (v_proj.abs().sum() > 0) == value_residual
    assert (model.model.layers[1].mixer.v_lora is not None) == value_residual
    assert model.model.layers[0].mixer.v_lora is None  # the first LSM layer publishes v_first, it does not mix


def test_rwkv7_later_layer_outside_a_model_forward_is_an_error():
    config = preset("tiny", lsm_mixer="rwkv7", layer_pattern="ll", num_layers=2)
    mixer = MIXERS["rwkv7"](config, layer_idx=1)
    with pytest.raises(ValueError, match="rwkv7 layer 1: the value residual needs the first LSM layer's value"):
        mixer(torch.randn(1, 4, config.hidden_size))
