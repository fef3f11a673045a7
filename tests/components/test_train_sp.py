"""Training with LASP-2 sequence parallelism (megatron's context-parallel group) against SP=1, on gloo.

Both runs go through the trainer's own path (``TrainingModel.train_step``: megatron schedule, DDP,
gradient clipping, AdamW from ``loop._build_optimizer``) for 3 steps on a hybrid GLA + softmax
attention model with MoE. The reference is the SP=1 run in the same spawned world with every rank
training on the whole batch (data parallelism over identical batches equals one process). The SP
run starts from the reference's initial weights (sharded with ``shard_state_dict`` where TP splits
them); its step-1 gradients and step-3 weights are gathered back to full tensors. Compared: the
logged losses (global means), gradient norms and MoE statistics, every step-1 gradient and every
step-3 weight.
"""
from __future__ import annotations

import datetime
import os
import socket
import tempfile
import traceback
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from linear_moe.kernels.testing import assert_rel_close

SEQ_LEN, BATCH, STEPS = 32, 2, 3
LOSS_RATIO, GRAD_RATIO = 1e-5, 1e-4
HYBRID_MOE = dict(layer_pattern="LA", num_layers=2, lsm_mixer="gla", moe_aux_loss_coeff=1e-2, moe_z_loss_coeff=1e-3)


def _batch(vocab_size: int) -> dict:
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, vocab_size, (BATCH, SEQ_LEN + 1), generator=gen)
    loss_mask = (torch.rand(BATCH, SEQ_LEN, generator=gen) > 0.2).float()  # uneven masked counts per chunk
    return dict(tokens=tokens[:, :-1].contiguous(), labels=tokens[:, 1:].contiguous(), loss_mask=loss_mask)


def _train(train_config, sizes: dict, batch: dict, full_state=None) -> dict:
    from megatron.core import parallel_state as ps

    from linear_moe.components.train.loop import _build_optimizer
    from linear_moe.components.train.step import TrainingModel
    from linear_moe.model.megatron import ParallelSizes, destroy_parallel, initialize_parallel
    from linear_moe.model.megatron.state_dict import RankCoords, gather_full_state_dict, shard_layout, shard_state_dict

    model_config = train_config.model_config()
    initialize_parallel(ParallelSizes(**sizes), seed=0)
    try:
        model = TrainingModel.build(model_config, seq_length=SEQ_LEN, micro_batch_size=BATCH, seed=0)
        module = model.chunks[0].module
        layout = shard_layout(module)
        coords = RankCoords.current(model_config.num_layers, model_config.num_experts)
        if full_state is not None:
            missing, unexpected = module.load_state_dict(shard_state_dict(full_state, layout, coords), strict=False)
            assert not unexpected and all(key.endswith("_extra_state") for key in missing), (missing, unexpected)
        state = lambda: {k: v for k, v in module.state_dict().items() if k in layout}  # noqa: E731
        initial = gather_full_state_dict(state(), layout, coords)
        optimizer = _build_optimizer(model, train_config)
        losses, norms, router_losses, load, grads = [], [], [], [], None
        for step in range(STEPS):
            loss, moe = model.train_step([batch], optimizer, grad_clip=train_config.grad_clip)
            losses.append(loss)
            norms.append(model.last_grad_norm)
            router_losses.append([moe["load_balancing_loss"], moe["z_loss"]])
            load.append(moe["expert_load"])
            if step == 0:
                local = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
                grads = gather_full_state_dict(local, layout, coords)
        return dict(losses=torch.tensor(losses), norms=torch.tensor(norms), router_losses=torch.tensor(router_losses),
                    expert_load=torch.tensor(load), grads=grads, initial=initial,
                    params=gather_full_state_dict(state(), layout, coords),
                    sp_size=ps.get_context_parallel_world_size())
    finally:
        destroy_parallel()


def _worker(rank: int, world: int, port: int, out_path: str, model: dict, sizes: dict) -> None:
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        import linear_moe.model.mixers  # noqa: F401  (fills the mixer registry)
        from linear_moe.components.train import TrainConfig

        train_config = TrainConfig(preset="tiny", model_overrides=model, seq_length=SEQ_LEN, micro_batch_size=BATCH,
                                   global_batch_size=BATCH, grad_clip=1.0, lr=3e-3)
        batch = _batch(train_config.model_config().vocab_size)
        results = {"reference": _train(train_config, {}, batch)}
        try:
            results["sp"] = _train(train_config, sizes, batch, full_state=results["reference"]["initial"])
        except Exception:  # reported by the test
            results["sp"] = traceback.format_exc()
        if rank == 0:
            torch.save(results, out_path)
    finally:
        dist.destroy_process_group()


def _run(world: int, model: dict, sizes: dict) -> dict:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.pt")
        mp.spawn(_worker, args=(world, port, out, model, sizes), nprocs=world, join=True)
        return torch.load(out, weights_only=True)


def _check_matches_reference(runs: dict, sp_size: int) -> None:
    reference, sp = runs["reference"], runs["sp"]
    assert not isinstance(sp, str), f"the SP run failed in the worker:\n{sp}"
    assert sp["sp_size"] == sp_size
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
def test_sp2_matches_sp1_losses_and_grads_hybrid_moe():
    _check_matches_reference(_run(2, HYBRID_MOE, dict(context=2)), 2)


@pytest.mark.distributed
@pytest.mark.xdist_group("dist")
def test_sp2_tp2_matches_single_process_losses_and_grads():
    _check_matches_reference(_run(4, HYBRID_MOE, dict(context=2, tensor=2)), 2)
