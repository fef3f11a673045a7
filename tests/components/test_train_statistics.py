"""What the trainer logs and optimises, against independent computations.

* ``TrainingModel.train_step``'s loss, load-balancing loss, z-loss and per-expert load (one process,
  megatron's routers and loss tracker) against the single-device Hugging Face model on the same
  weights and tokens, whose routers are checked against a per-token loop in tests/model/test_moe.py:
  relative error 1e-6 (loads: exact fractions of integer counts);
* a step after a backward outside the schedule (which leaves megatron's aux-loss scale 0-d) against
  the same step in a clean state: equal losses;
* ``masked_mean_loss`` against ``sum(loss * mask) / sum(mask)``;
* ``causal_lm_loss`` over packed documents against cross entropy per document, token-weighted, and
  ``loss = lm_loss + aux_loss``.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from linear_moe.kernels.testing import assert_rel_close

MODEL = dict(layer_pattern="LA", num_layers=2, lsm_mixer="gla", moe_aux_loss_coeff=1e-2, moe_z_loss_coeff=1e-3)


@pytest.mark.distributed
@pytest.mark.xdist_group("dist")
def test_a_backward_outside_the_schedule_does_not_break_the_next_step():
    """Seen on an H200, where a grouped-GEMM test's plain backward ran before a training test in one
    worker: megatron's schedule failed with "output with shape [] doesn't match the broadcast shape [1]"."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from linear_moe.components.train import TrainConfig
    from linear_moe.components.train.data import random_batches
    from linear_moe.components.train.distributed import world_of_one
    from linear_moe.components.train.optim import build_optimizer
    from linear_moe.components.train.step import TrainingModel

    config = TrainConfig(preset="tiny", model_overrides=MODEL, lr=1e-3, min_lr=1e-3, seq_length=32,
                         micro_batch_size=2, global_batch_size=2, seed=0)
    (batch,) = random_batches(1, batch_size=2, seq_length=32, vocab_size=config.model_config().vocab_size,
                              generator=torch.Generator().manual_seed(0))
    losses = []
    with world_of_one():
        for leave_a_0d_scale in (False, True):
            if leave_a_0d_scale:  # what the first backward through a MoE layer outside a schedule does
                MoEAuxLossAutoScaler.main_loss_backward_scale = None
                x = torch.zeros(2, requires_grad=True)
                MoEAuxLossAutoScaler.apply(x, torch.zeros((), requires_grad=True)).sum().backward()
                assert MoEAuxLossAutoScaler.main_loss_backward_scale.shape == ()
            model = TrainingModel.from_config(config)
            losses.append(model.train_step([batch], build_optimizer(model.chunks, config))[0])
    assert losses[1] == losses[0]


@pytest.mark.distributed
@pytest.mark.xdist_group("dist")
@pytest.mark.parametrize("router, aux_loss_type", [
    ("softmax_topk", "aux_loss"),
    ("softmax_topk", "seq_aux_loss"),
    ("sigmoid_bias", "seq_aux_loss"),  # with a nonzero selection bias, which the balance loss must not count
    ("mixtral", "aux_loss"),  # after a seq_aux_loss run in the same process: megatron's tracker is global
])
def test_logged_moe_statistics_match_the_single_device_model(router, aux_loss_type):
    from megatron.core.transformer.moe.router import TopKRouter

    from dist_support import FullView
    from linear_moe.components.convert.adapter import mcore_to_hf
    from linear_moe.components.train import TrainConfig
    from linear_moe.components.train.data import random_batches
    from linear_moe.components.train.distributed import world_of_one
    from linear_moe.components.train.optim import build_optimizer
    from linear_moe.components.train.step import TrainingModel
    from linear_moe.model.modeling import LinearMoEConfig, LinearMoEForCausalLM
    from linear_moe.model.moe import BALANCE_LOSSES, router_z_loss

    overrides = {**MODEL, "moe_router": router, "moe_aux_loss_type": aux_loss_type}
    config = TrainConfig(preset="tiny", model_overrides=overrides, lr=1e-3, min_lr=1e-3, seq_length=32,
                         micro_batch_size=2, global_batch_size=2, seed=0)
    (batch,) = random_batches(1, batch_size=2, seq_length=32, vocab_size=config.model_config().vocab_size,
                              generator=torch.Generator().manual_seed(0))
    with world_of_one():
        model = TrainingModel.from_config(config)
        routers = [m for m in model.chunks[0].module.modules() if isinstance(m, TopKRouter)]
        for module in routers:
            if module.expert_bias is not None:
                module.expert_bias.copy_(0.3 * torch.randn(module.expert_bias.shape))
        full = FullView(model.chunks[0].module, config.model_config()).state()  # before the step changes it
        loss, moe = model.train_step([batch], build_optimizer(model.chunks, config))
    assert len(routers) == 2 and all((m.expert_bias is not None) == (router == "sigmoid_bias") for m in routers)

    hf = LinearMoEForCausalLM(LinearMoEConfig.from_model_config(config.model_config())).eval()
    hf.load_state_dict(mcore_to_hf(full), strict=True)
    aux, z, loads = [], [], []

    def record(module, inputs, output):
        routing = module.router(inputs[0].reshape(-1, inputs[0].shape[-1]))
        probs_BTE = routing.probs_TE.view(*inputs[0].shape[:2], -1)
        aux.append(float(BALANCE_LOSSES[aux_loss_type](probs_BTE, module.top_k)))
        z.append(float(router_z_loss(routing.logits_TE)))
        counts = output[1].tokens_per_expert.double()
        loads.append((counts / counts.sum()).tolist())

    for layer in hf.model.layers:
        if layer.kind.is_moe:
            layer.ffn.register_forward_hook(record)
    with torch.no_grad():
        hf(batch["tokens"])  # the routers see the training tokens
    assert len(aux) == 2, "both layers are MoE"
    sequence = torch.cat([batch["tokens"], batch["labels"][:, -1:]], dim=1)  # HF shifts the labels inside
    with torch.no_grad():
        reference_loss = float(hf(sequence, labels=sequence).lm_loss)
    assert math.isclose(loss, reference_loss, rel_tol=1e-6), (loss, reference_loss)
    assert math.isclose(moe["load_balancing_loss"], sum(aux[:2]) / 2, rel_tol=1e-6), (moe, aux)
    assert math.isclose(moe["z_loss"], sum(z[:2]) / 2, rel_tol=1e-6), (moe, z)
    assert_rel_close("expert load", torch.tensor(loads[:2]), torch.tensor(moe["expert_load"]), 1e-6)


def test_every_balance_loss_has_its_megatron_tracker_name():
    from linear_moe.components.train.step import TRACKED_BALANCE_LOSS
    from linear_moe.model.moe import BALANCE_LOSSES

    assert set(TRACKED_BALANCE_LOSS) == set(BALANCE_LOSSES)


def test_masked_mean_loss_is_the_mean_over_unmasked_tokens():
    from linear_moe.model.megatron.step import masked_mean_loss

    per_token = torch.rand(3, 7, generator=torch.Generator().manual_seed(0))
    mask = (torch.rand(3, 7, generator=torch.Generator().manual_seed(1)) > 0.4).float()
    loss, logged = masked_mean_loss(mask, per_token)
    expected = sum(float(per_token[i, j]) for i in range(3) for j in range(7) if mask[i, j]) / float(mask.sum())
    assert math.isclose(float(loss), expected, rel_tol=1e-6)
    assert math.isclose(float(logged["lm loss"]), expected, rel_tol=1e-6)


def test_causal_lm_loss_never_predicts_across_documents():
    from linear_moe.model import preset
    from linear_moe.model.modeling import LinearMoEConfig, LinearMoEForCausalLM

    torch.manual_seed(0)
    model = LinearMoEForCausalLM(LinearMoEConfig.from_model_config(preset("tiny-hybrid"))).eval()
    offsets = [0, 5, 22, 31]
    tokens = torch.randint(0, 512, (1, offsets[-1]))
    with torch.no_grad():
        packed = model(tokens, labels=tokens, cu_seqlens=torch.tensor(offsets))
        sums, count = 0.0, 0
        for start, end in zip(offsets[:-1], offsets[1:]):
            logits = model(tokens[:, start:end]).logits[0, :-1]
            sums += float(F.cross_entropy(logits, tokens[0, start + 1:end], reduction="sum"))
            count += end - start - 1
    assert math.isclose(float(packed.lm_loss), sums / count, rel_tol=1e-5)
    assert float(packed.aux_loss) > 0
    assert math.isclose(float(packed.loss), float(packed.lm_loss) + float(packed.aux_loss), rel_tol=1e-6)
