"""The assembled megatron model (TP = 1) against a hand-written forward built from single-device mixers.

This pins what the parallel tests cannot see (they compare the assembly with itself): the (T, B, D)
<-> (B, T, D) adaptation, the residual/norm order, SwiGLU's [gate; up] order, and that mixer weights
keep their single-device names under ``decoder.layers.<i>.self_attention.mixer.``.
"""
import pytest
import torch
import torch.nn.functional as F

from dist_support import spawn_world
from linear_moe.kernels.testing import assert_rel_close

pytestmark = [pytest.mark.distributed, pytest.mark.xdist_group("dist")]


def _rms(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _reference_loss(mc, state, tokens_BT, labels_BT):
    from linear_moe.model.mixers import MIXERS

    h = state["embedding.word_embeddings.weight"][tokens_BT]
    for i, kind in enumerate(mc.layer_kinds):
        prefix = f"decoder.layers.{i}."
        mixer = MIXERS["attention" if kind.is_attention else mc.lsm_mixer](mc, layer_idx=i)
        mixer_state = {k[len(prefix + "self_attention.mixer."):]: v for k, v in state.items()
                       if k.startswith(prefix + "self_attention.mixer.")}
        mixer.load_state_dict(mixer_state, strict=True)
        h = h + mixer(_rms(h, state[prefix + "input_layernorm.weight"], mc.norm_eps))[0]
        m = _rms(h, state[prefix + "pre_mlp_layernorm.weight"], mc.norm_eps)
        gate, up = state[prefix + "mlp.linear_fc1.weight"].chunk(2)
        h = h + (F.silu(m @ gate.T) * (m @ up.T)) @ state[prefix + "mlp.linear_fc2.weight"].T
    logits = _rms(h, state["decoder.final_layernorm.weight"], mc.norm_eps) @ state["output_layer.weight"].T
    return F.cross_entropy(logits.flatten(0, 1), labels_BT.flatten(), reduction="none").view_as(labels_BT)


def _worker(rank, scratch_dir):
    import linear_moe.model.mixers  # noqa: F401
    from linear_moe.model import preset
    from linear_moe.model.megatron.config import transformer_config
    from linear_moe.model.megatron.gpt import build_gpt_model
    from linear_moe.model.megatron.parallel import ParallelSizes, initialize_parallel

    initialize_parallel(ParallelSizes())
    mc = preset("tiny", layer_pattern="la", num_layers=2, lsm_mixer="gla")
    model = build_gpt_model(mc, transformer_config(mc))
    tokens = torch.randint(0, mc.vocab_size, (2, 21), generator=torch.Generator().manual_seed(0))
    tokens_BT, labels_BT = tokens[:, :-1], tokens[:, 1:]
    loss_BT = model(tokens_BT, torch.arange(20).expand(2, 20), None, labels=labels_BT)
    state = {k: v.detach() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    with torch.no_grad():
        reference_BT = _reference_loss(mc, state, tokens_BT, labels_BT)
    return dict(loss=loss_BT.detach(), reference=reference_BT)


def test_tp1_model_matches_hand_written_forward():
    result = spawn_world(_worker, nprocs=1)
    assert result["loss"].shape == result["reference"].shape == (2, 20)
    assert_rel_close("per-token loss", result["reference"], result["loss"], 1e-5)
