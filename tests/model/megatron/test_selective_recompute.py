"""``recompute: selective``: every layer's sequence mixer (LSM or softmax attention) keeps only its
input and runs again in the backward pass.

Reference: the same model without recompute, from the same initial weights (one process, fp32):
loss equal and every gradient within 1e-6 relative error. Evidence that the recompute happens: each
mixer's forward runs twice per step instead of once, and the activations autograd keeps outside the
checkpoints (counted with ``saved_tensors_hooks``) shrink.
"""
import pytest
import torch

from dist_support import spawn_world
from linear_moe.kernels.testing import assert_rel_close

pytestmark = [pytest.mark.distributed, pytest.mark.xdist_group("dist")]

B, T = 2, 32


def _step(model_config, recompute: str | None, tokens_BT) -> dict:
    from linear_moe.model.megatron.config import transformer_config
    from linear_moe.model.megatron.gpt import build_gpt_model
    from linear_moe.model.megatron.mixer_adapter import MixerAdapter

    model = build_gpt_model(model_config, transformer_config(model_config, recompute=recompute), seed=3)
    calls = []
    for module in model.modules():
        if isinstance(module, MixerAdapter):
            module.mixer.register_forward_pre_hook(lambda mod, args, name=type(module.mixer).__name__: calls.append(name))
    saved_bytes = [0]

    def pack(tensor):
        saved_bytes[0] += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss_BT = model(tokens_BT[:, :-1], torch.arange(T).expand(B, T), None, labels=tokens_BT[:, 1:])
    loss = loss_BT.mean()
    loss.backward()
    return dict(loss=loss.detach(), calls=calls, saved_bytes=saved_bytes[0],
                grads={name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})


def _worker(rank, scratch_dir, mixer: str):
    import linear_moe.model.mixers  # noqa: F401
    from linear_moe.model import preset
    from linear_moe.model.megatron.parallel import ParallelSizes, destroy_parallel, initialize_parallel

    initialize_parallel(ParallelSizes())
    try:
        model_config = preset("tiny", layer_pattern="llA", num_layers=3, lsm_mixer=mixer)  # rwkv7: v_first read
        tokens_BT = torch.randint(0, model_config.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(0))
        return {name: _step(model_config, recompute, tokens_BT) for name, recompute in (("none", None),
                                                                                        ("selective", "selective"))}
    finally:
        destroy_parallel()


@pytest.mark.parametrize("mixer", ["gla", "rwkv7"])
def test_selective_recompute_reruns_mixers_with_the_same_gradients(mixer):
    runs = spawn_world(_worker, args=(mixer,), nprocs=1)
    plain, selective = runs["none"], runs["selective"]
    assert_rel_close("loss", plain["loss"], selective["loss"], 1e-6)
    assert set(plain["grads"]) == set(selective["grads"]) and plain["grads"]
    for name, grad in plain["grads"].items():
        assert_rel_close(f"grad {name}", grad, selective["grads"][name], 1e-6)
    assert len(plain["calls"]) == 3, plain["calls"]  # two LSM mixers, one attention mixer
    assert sorted(selective["calls"]) == sorted(plain["calls"] * 2), selective["calls"]
    # the mixers' activations go (GLA: 2.36 MB -> 1.29 MB kept); the MLP, MoE, norms and logits stay
    assert selective["saved_bytes"] < 0.6 * plain["saved_bytes"], (selective["saved_bytes"], plain["saved_bytes"])
