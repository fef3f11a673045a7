"""Training with LASP-2 sequence parallelism (megatron's context-parallel group) against SP=1, on gloo,
alone and composed with tensor, expert and pipeline parallelism.

Both runs go through the trainer's own path (``TrainingModel.train_step``: megatron schedule, DDP,
gradient clipping, the optimizer from ``optim.build_optimizer``) for 3 steps, on a hybrid GLA + softmax
attention model with MoE (SP, SP x EP; SP x TP with DeepSeek-V3 routing and its sequence-wise balance
loss) or a gated-DeltaNet model with one MoE layer (SP x PP). The reference is the single-process layout (TP = PP = EP = SP = 1) run in the same
spawned world with every rank training on the whole batch (data parallelism over identical batches
equals one process). The parallel run starts from the reference's initial weights (sharded with
``shard_state_dict`` where TP/EP/PP split them); its step-1 gradients and step-3 weights are
gathered back to full tensors. Compared, fp32, as relative RMS error: the logged losses (global
means), gradient norms and router losses within 1e-5; the logged per-expert load exactly; every
step-1 gradient and every step-3 weight within 1e-4 (the layouts only reorder floating-point sums).
"""
from __future__ import annotations

import traceback

import pytest
import torch

from dist_support import FullView, spawn_world
from linear_moe.kernels.testing import assert_rel_close

SEQ_LEN, BATCH, STEPS = 32, 2, 3
LOSS_RATIO, GRAD_RATIO = 1e-5, 1e-4
HYBRID_MOE = dict(layer_pattern="LA", num_layers=2, lsm_mixer="gla", moe_aux_loss_coeff=1e-2, moe_z_loss_coeff=1e-3)
# DeepSeek-V3 routing: a sequence-wise balance loss (per-sequence counts reduced over the TP x SP ranks)
HYBRID_MOE_SEQ_BALANCE = dict(HYBRID_MOE, moe_router="sigmoid_bias", moe_aux_loss_type="seq_aux_loss")
# two pipeline stages of one layer each: a dense gated-DeltaNet layer, then one with MoE
GATED_DELTANET_MOE = dict(layer_pattern="lL", num_layers=2, lsm_mixer="gated_deltanet", moe_aux_loss_coeff=1e-2,
                          moe_z_loss_coeff=1e-3)


def _batch(vocab_size: int) -> dict:
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, vocab_size, (BATCH, SEQ_LEN + 1), generator=gen)
    loss_mask = (torch.rand(BATCH, SEQ_LEN, generator=gen) > 0.2).float()  # uneven masked counts per chunk
    return dict(tokens=tokens[:, :-1].contiguous(), labels=tokens[:, 1:].contiguous(), loss_mask=loss_mask)


def _train(train_config, sizes: dict, batch: dict, full_state=None) -> dict:
    from megatron.core import parallel_state as ps

    from linear_moe.components.train.optim import build_optimizer
    from linear_moe.components.train.step import TrainingModel
    from linear_moe.model.megatron import ParallelSizes, destroy_parallel, initialize_parallel

    initialize_parallel(ParallelSizes(**sizes), seed=0)
    try:
        model = TrainingModel.from_config(train_config)
        view = FullView(model.chunks[0].module, train_config.model_config(), full_state)
        initial = view.state()
        optimizer = build_optimizer(model.chunks, train_config)
        losses, norms, router_losses, load, grads = [], [], [], [], None
        for step in range(STEPS):
            loss, moe = model.train_step([batch], optimizer)
            losses.append(loss)
            norms.append(model.last_grad_norm)
            router_losses.append([moe["load_balancing_loss"], moe["z_loss"]])
            load.append(moe["expert_load"])
            if step == 0:
                grads = view.grads()
        return dict(losses=torch.tensor(losses), norms=torch.tensor(norms), router_losses=torch.tensor(router_losses),
                    expert_load=torch.tensor(load), grads=grads, initial=initial,
                    params=view.state(),
                    sizes=dict(tensor=ps.get_tensor_model_parallel_world_size(),
                               pipeline=ps.get_pipeline_model_parallel_world_size(),
                               expert=ps.get_expert_model_parallel_world_size(),
                               context=ps.get_context_parallel_world_size()))
    finally:
        destroy_parallel()


def _worker(rank: int, scratch_dir: str, model: dict, sizes: dict) -> dict:
    import linear_moe.model.mixers  # noqa: F401  (fills the mixer registry)
    from linear_moe.components.train import TrainConfig

    train_config = TrainConfig(preset="tiny", model_overrides=model, seq_length=SEQ_LEN, micro_batch_size=BATCH,
                               global_batch_size=BATCH, grad_clip=1.0, lr=3e-3, seed=0)
    batch = _batch(train_config.model_config().vocab_size)
    results = {"reference": _train(train_config, {}, batch)}
    try:
        results["sp"] = _train(train_config, sizes, batch, full_state=results["reference"]["initial"])
    except Exception:  # reported by the test
        results["sp"] = traceback.format_exc()
    return results


def _check_matches_reference(runs: dict, sizes: dict) -> None:
    """``sizes``: the ParallelSizes kwargs the parallel run was asked for (checked against megatron's groups)."""
    reference, sp = runs["reference"], runs["sp"]
    assert not isinstance(sp, str), f"the SP run failed in the worker:\n{sp}"
    assert sp["sizes"] == {**dict(tensor=1, pipeline=1, expert=1, context=1), **sizes}, sp["sizes"]
    assert set(sp["grads"]) == set(reference["grads"]), "gradients missing or renamed"
    assert_rel_close("losses", reference["losses"], sp["losses"], LOSS_RATIO)
    assert_rel_close("grad norms", reference["norms"], sp["norms"], LOSS_RATIO)
    assert_rel_close("logged router losses", reference["router_losses"], sp["router_losses"], LOSS_RATIO)
    assert_rel_close("logged expert load", reference["expert_load"], sp["expert_load"], 0.0)
    for name, grad in reference["grads"].items():
        assert_rel_close(f"step-1 grad {name}", grad, sp["grads"][name], GRAD_RATIO)
    for name, param in reference["params"].items():
        assert_rel_close(f"step-3 param {name}", param, sp["params"][name], GRAD_RATIO)


def test_seq_length_not_divisible_by_sp_is_rejected():
    from linear_moe.components.train import TrainConfig

    with pytest.raises(ValueError, match="sequence_parallel=4 must divide seq_length=30"):
        TrainConfig(seq_length=30, sequence_parallel=4)


@pytest.mark.distributed
@pytest.mark.xdist_group("dist")
@pytest.mark.parametrize("world, model, sizes", [
    (2, HYBRID_MOE, dict(context=2)),
    (4, HYBRID_MOE, dict(context=4)),
    (4, HYBRID_MOE_SEQ_BALANCE, dict(context=2, tensor=2)),
    # SP=2 leaves DP=2; EP=2 splits the 4 experts, expert-DP=2
    (4, HYBRID_MOE, dict(context=2, expert=2)),
    # one layer per stage, each stage's sequence split over 2 SP ranks
    (4, GATED_DELTANET_MOE, dict(context=2, pipeline=2)),
], ids=["sp2-hybrid_moe", "sp4-hybrid_moe", "sp2_tp2-hybrid_moe_seq_balance", "sp2_ep2-hybrid_moe", "sp2_pp2-gated_deltanet_moe"])
def test_sequence_parallel_matches_single_process_losses_and_grads(world, model, sizes):
    _check_matches_reference(spawn_world(_worker, args=(model, sizes), nprocs=world), sizes)
