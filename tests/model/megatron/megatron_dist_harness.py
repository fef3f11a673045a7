"""Run a layout (TP/PP/EP/DP) against the one-process reference on gloo, in spawned processes.

Both runs happen in the same spawned world. The reference is the TP = PP = EP = 1 model where every
rank trains on the whole batch, which is the single-process run (data parallelism averages identical
gradients). Its initial full state dict is then sharded into the layout's model with
``shard_state_dict``; the layout's gradients and parameters are gathered back with
``gather_full_state_dict`` for comparison.
"""
from __future__ import annotations

import os
import socket
import tempfile
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SEQ_LEN = 32
GLOBAL_BATCH = 2
STEPS = 3


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_case(case: dict, world_size: int = 2) -> dict:
    """Spawn ``world_size`` gloo ranks running :func:`_worker` on ``case``; return rank 0's result."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(world_size, free_port(), out_dir, case), nprocs=world_size, join=True)
        return torch.load(os.path.join(out_dir, "result.pt"), weights_only=False)


def _batch(vocab_size: int) -> dict:
    generator = torch.Generator().manual_seed(1234)
    tokens = torch.randint(0, vocab_size, (GLOBAL_BATCH, SEQ_LEN + 1), generator=generator)
    return dict(tokens=tokens[:, :-1].contiguous(), labels=tokens[:, 1:].contiguous())


def _train(model_config, sizes, batch, full_state=None, attention_mixer="attention"):
    """Build, optionally load ``full_state``, train STEPS steps; return losses, step-1 grads, final params (full)."""
    from megatron.core import parallel_state as ps

    from linear_moe.model.megatron.config import transformer_config
    from linear_moe.model.megatron.gpt import build_gpt_model
    from linear_moe.model.megatron.parallel import initialize_parallel
    from linear_moe.model.megatron.state_dict import RankCoords, gather_full_state_dict, shard_layout, shard_state_dict
    from linear_moe.model.megatron.step import train_step, wrap_ddp

    initialize_parallel(sizes, seed=0)
    config = transformer_config(model_config, sizes)
    torch.manual_seed(0)
    model = build_gpt_model(model_config, config, attention_mixer=attention_mixer)
    layout = shard_layout(model)
    coords = RankCoords.current(model_config.num_layers, model_config.num_experts)
    if full_state is not None:
        missing, unexpected = model.load_state_dict(shard_state_dict(full_state, layout, coords), strict=False)
        assert not unexpected and all(key.endswith("_extra_state") for key in missing), (missing, unexpected)
    initial = gather_full_state_dict({k: v for k, v in model.state_dict().items() if k in layout}, layout, coords)
    ddp = wrap_ddp(model, config)
    optimizer = torch.optim.AdamW(ddp.parameters(), lr=3e-3, weight_decay=0.1)
    dp_size, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    rows = slice(dp_rank * GLOBAL_BATCH // dp_size, (dp_rank + 1) * GLOBAL_BATCH // dp_size)
    local_batch = {key: value[rows] for key, value in batch.items()}
    losses, grads = [], None
    for step in range(STEPS):
        losses.append(train_step([ddp], optimizer, [local_batch], 1, SEQ_LEN, GLOBAL_BATCH // dp_size))
        if step == 0:
            local_grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
            grads = gather_full_state_dict(local_grads, layout, coords)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, losses)
    stage_losses = torch.tensor([rank_losses for rank_losses in gathered if rank_losses[0] is not None])
    params = gather_full_state_dict({k: v for k, v in model.state_dict().items() if k in layout}, layout, coords)
    ps.destroy_model_parallel()
    return dict(losses=stage_losses.mean(0), grads=grads, params=params, initial=initial)


def _worker(rank: int, world_size: int, port: int, out_dir: str, case: dict) -> None:
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        import linear_moe.model.mixers  # noqa: F401  (fills the mixer registry)
        from linear_moe.model import preset
        from linear_moe.model.megatron.parallel import ParallelSizes

        model_config = preset("tiny", **case["model"])
        batch = _batch(model_config.vocab_size)
        attention_mixer = case.get("attention_mixer", "attention")
        reference = _train(model_config, ParallelSizes(), batch, attention_mixer=attention_mixer)
        layout = _train(model_config, ParallelSizes(**case["sizes"]), batch, full_state=reference["initial"],
                        attention_mixer=attention_mixer)
        if rank == 0:
            torch.save(dict(reference=reference, layout=layout), os.path.join(out_dir, "result.pt"))
    finally:
        dist.destroy_process_group()
