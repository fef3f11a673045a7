"""Run layouts (TP/PP/EP/DP) against the one-process reference on gloo, in spawned processes.

Everything happens in one spawned world per model. The reference is the TP = PP = EP = 1 model where
every rank trains on the whole batch, which is the single-process run (data parallelism averages
identical gradients). Its initial full state dict is sharded into each layout's model with
``shard_state_dict``; the layout's gradients and parameters are gathered back with
``gather_full_state_dict``. A layout splits the batch over its data-parallel ranks unless it says
``replicate_data`` (then every DP rank sees the whole batch).
"""
from __future__ import annotations

import traceback

import torch
import torch.distributed as dist

from dist_support import FullView, spawn_world

SEQ_LEN = 32
GLOBAL_BATCH = 2
STEPS = 3
GRAD_CLIP = 0.5  # small enough that clipping acts: the clipped update depends on the global norm
#: transformer_config overrides for megatron's grouped-GEMM experts (GroupedMLP) in fp32 on CPU: GroupedMLP
#: asserts config.bf16, and on our code paths bf16=True changes nothing else (the parameters stay fp32:
#: we never wrap in Float16Module, our mixers replace megatron's attention, the optimizer is torch's);
#: test_grouped_gemm.py checks that bf16=True alone leaves the per-expert model's logits bit-identical.
GROUPED_GEMM_CONFIG = dict(moe_grouped_gemm=True, bf16=True)


def run_layouts(model: dict, layouts: dict[str, dict], world_size: int = 2, attention_mixer: str = "attention") -> dict:
    """Spawn ``world_size`` gloo ranks; return ``{"reference": run, <layout name>: run or error string}``.

    ``model``: overrides of the "tiny" preset. ``layouts``: name -> ``dict(sizes=ParallelSizes kwargs,
    replicate_data=bool, config=transformer_config kwargs)``. A run is ``dict(losses, grads, params, initial)`` with full-model names.
    """
    case = dict(model=model, layouts=layouts, attention_mixer=attention_mixer)
    return spawn_world(_worker, args=(case,), nprocs=world_size, timeout_s=90)


def _batch(vocab_size: int) -> dict:
    generator = torch.Generator().manual_seed(1234)
    tokens = torch.randint(0, vocab_size, (GLOBAL_BATCH, SEQ_LEN + 1), generator=generator)
    return dict(tokens=tokens[:, :-1].contiguous(), labels=tokens[:, 1:].contiguous())


def _train(model_config, sizes, batch, full_state=None, attention_mixer="attention", split_data=True,
           config_kwargs=None):
    """Build, optionally load ``full_state``, train STEPS steps; return losses, step-1 grads, final params (full)."""
    from megatron.core import parallel_state as ps

    from linear_moe.model.megatron.config import transformer_config
    from linear_moe.model.megatron.gpt import build_gpt_model
    from linear_moe.model.megatron.parallel import initialize_parallel
    from linear_moe.components.train.config import TrainConfig
    from linear_moe.components.train.optim import TorchAdamW
    from linear_moe.components.train.step import TrainingModel
    from linear_moe.model.megatron.step import wrap_ddp

    initialize_parallel(sizes, seed=0)
    try:
        config = transformer_config(model_config, sizes, **(config_kwargs or {}))
        torch.manual_seed(0)
        model = build_gpt_model(model_config, config, attention_mixer=attention_mixer)
        view = FullView(model, model_config, full_state)
        initial = view.state()
        ddp = wrap_ddp(model, config)
        optimizer = TorchAdamW([ddp], TrainConfig(lr=3e-3, weight_decay=0.1, grad_clip=GRAD_CLIP))
        dp_size, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        if not split_data:
            dp_size, dp_rank = 1, 0
        rows = slice(dp_rank * GLOBAL_BATCH // dp_size, (dp_rank + 1) * GLOBAL_BATCH // dp_size)
        local_batch = {key: value[rows] for key, value in batch.items()}
        trainer = TrainingModel(model_config, config, [ddp], seq_length=SEQ_LEN,
                                micro_batch_size=GLOBAL_BATCH // dp_size)
        losses, grads = [], None
        for step in range(STEPS):
            # the production step, with gradient clipping active: the global norm must agree across layouts
            losses.append(trainer.train_step([local_batch], optimizer)[0])
            if step == 0:
                grads = view.grads()
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, losses)
        stage_losses = torch.tensor(gathered)  # train_step returns the global mean loss on every rank
        return dict(losses=stage_losses.mean(0), grads=grads, params=view.state(),
                    initial=initial)
    finally:
        ps.destroy_model_parallel()


def _worker(rank: int, scratch_dir: str, case: dict) -> dict:
    import linear_moe.model.mixers  # noqa: F401  (fills the mixer registry)
    from linear_moe.model import preset
    from linear_moe.model.megatron.parallel import ParallelSizes

    model_config = preset("tiny", **case["model"])
    batch = _batch(model_config.vocab_size)
    mixer = case["attention_mixer"]
    results = {"reference": _train(model_config, ParallelSizes(), batch, attention_mixer=mixer, split_data=False)}
    for name, layout in case["layouts"].items():
        try:
            results[name] = _train(
                model_config, ParallelSizes(**layout["sizes"]), batch, full_state=results["reference"]["initial"],
                attention_mixer=mixer, split_data=not layout.get("replicate_data", False),
                config_kwargs=layout.get("config"),
            )
        except Exception:  # reported by the test that owns this layout
            results[name] = traceback.format_exc()
    return results
