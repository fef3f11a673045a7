"""Entry functions of the convert step: megatron dist checkpoint <-> Hugging Face directory."""
from __future__ import annotations

import json
from pathlib import Path

from linear_moe.components.convert import adapter, hf_io, megatron_io
from linear_moe.components.files import atomic_dir, check_replaceable
from linear_moe.components.train.checkpoint import STATE_FILE

DIRECTIONS = ("mcore-to-hf", "hf-to-mcore")


def convert(checkpoint: str | Path, output_dir: str | Path, tokenizer_dir: str | Path | None = None, *,
            shard_size: str | int = "2GB", dtype: str = "float32") -> Path:
    """Export a training checkpoint (any TP/PP/EP layout) as a Hugging Face ``LinearMoEForCausalLM``.

    ``checkpoint``: a step directory, or a train output dir / checkpoints root (its latest complete
    checkpoint is taken). The model is rebuilt at TP = PP = EP = 1, ``dist_checkpointing`` reshards the
    checkpoint into it, and :mod:`.adapter` renames the full state dict. ``output_dir`` is replaced
    atomically. Returns ``output_dir``.
    """
    hf_io.check_write_options(shard_size, dtype)
    check_replaceable(output_dir, "config.json")
    step = megatron_io.resolve_checkpoint(checkpoint)
    model_config = megatron_io.read_model_config(step)
    if tokenizer_dir is not None:
        hf_io.check_tokenizer(tokenizer_dir, model_config.vocab_size)  # fail before the slow part
    with megatron_io.single_process_megatron():
        model = megatron_io.build_full_model(model_config)
        megatron_io.load_dist_checkpoint(model, step / megatron_io.MODEL_DIR)
        mcore_state = megatron_io.tensor_state_dict(model)
    hf_state = adapter.mcore_to_hf(mcore_state)
    output_dir = Path(output_dir)
    with atomic_dir(output_dir, "config.json") as tmp:
        hf_io.write_hf_dir(tmp, model_config, hf_state, shard_size=shard_size, dtype=dtype,
                           tokenizer_dir=tokenizer_dir)
    return output_dir


def hf_to_megatron(hf_dir: str | Path, output_checkpoint_dir: str | Path) -> Path:
    """Write a Hugging Face directory as a training checkpoint: ``model/`` (dist_checkpointing) and
    ``train_state.json`` (``model_config``, ``step`` 0). It loads into any TP/PP/EP layout; to continue
    training with ``resume``, write it to ``<train output_dir>/checkpoints/step_0000000``.
    Returns ``output_checkpoint_dir``."""
    check_replaceable(output_checkpoint_dir, STATE_FILE, "output_checkpoint_dir")
    model_config, hf_state = hf_io.read_hf_dir(hf_dir)
    mcore_state = adapter.hf_to_mcore(hf_state)
    output_checkpoint_dir = Path(output_checkpoint_dir)
    with atomic_dir(output_checkpoint_dir, STATE_FILE, "output_checkpoint_dir") as tmp, \
            megatron_io.single_process_megatron():
        model = megatron_io.build_full_model(model_config)
        megatron_io.assign_tensors(model, mcore_state)
        megatron_io.save_dist_checkpoint(model, tmp / megatron_io.MODEL_DIR)
        state = {"model_config": model_config.to_dict(), "step": 0, "source": {"hf_dir": str(hf_dir)}}
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    return output_checkpoint_dir
