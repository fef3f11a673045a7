"""Training on packed documents (``TrainConfig.reset_at_eod``): the megatron model runs a batch as one
``(1, B*T)`` sequence with document offsets, so no document sees another.

Reference: the single-device Hugging Face model on the exported weights, run on each document
separately: per-token losses equal within 1e-5 (relative RMS, fp32), for a hybrid (LSM + softmax
attention with MoE) of three LSM families, one process and SP=2 (documents crossing the ranks'
boundary). Without the offsets the same batch gives other losses, so the reset is what matches.
"""
import pytest
import torch
import torch.nn.functional as F

from dist_support import spawn_world
from linear_moe.kernels.testing import assert_rel_close, rel_error

pytestmark = [pytest.mark.distributed, pytest.mark.xdist_group("dist")]

B, T, EOD = 2, 24, 0
#: EOD positions per sample: sample 0 holds three documents, sample 1 two (and its start is a boundary)
EOD_POSITIONS = {0: (6, 15), 1: (10,)}


def _batch(vocab_size: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab_size, (B, T + 1), generator=generator)
    for b, positions in EOD_POSITIONS.items():
        ids[b, list(positions)] = EOD
    return {"tokens": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous()}


def test_document_offsets_of_a_batch():
    from linear_moe.model.megatron.step import document_offsets

    offsets = document_offsets(_batch(64)["tokens"], EOD)
    assert offsets.dtype == torch.int64
    assert offsets.tolist() == [0, 7, 16, 24, 35, 48]
    tokens = torch.tensor([[5, 0, 3, 0]])  # an EOD in the last position starts nothing inside the batch
    assert document_offsets(tokens, EOD).tolist() == [0, 2, 4]


def _worker(rank, scratch_dir, mixer: str, context: int):
    import linear_moe.model.mixers  # noqa: F401
    from linear_moe.components.convert.adapter import mcore_to_hf
    from linear_moe.model import preset
    from linear_moe.model.megatron.config import transformer_config
    from linear_moe.model.megatron.gpt import build_gpt_model
    from linear_moe.model.megatron.parallel import ParallelSizes, destroy_parallel, initialize_parallel
    from linear_moe.model.megatron.state_dict import RankCoords, gather_full_state_dict, shard_layout
    from linear_moe.model.megatron.step import document_offsets, lm_forward_step
    from linear_moe.model.modeling import LinearMoEConfig, LinearMoEForCausalLM

    sizes = ParallelSizes(context=context)
    initialize_parallel(sizes)
    try:
        mc = preset("tiny", layer_pattern="LA", num_layers=2, lsm_mixer=mixer, chunk_size=8)
        model = build_gpt_model(mc, transformer_config(mc, sizes), seed=5).eval()
        batch = _batch(mc.vocab_size)
        losses = {}
        with torch.no_grad():
            for name, extra in (("packed", {"cu_seqlens": document_offsets(batch["tokens"], EOD)}), ("unpacked", {})):
                per_token, _ = lm_forward_step(iter([{**batch, **extra}]), model)
                gathered = [torch.zeros_like(per_token) for _ in range(context)]
                torch.distributed.all_gather(gathered, per_token.contiguous())
                # CP chunks of the (1, B*T) packed run, or of every sample of the (B, T) one
                losses[name] = torch.cat(gathered, dim=1).reshape(B, T)
        layout = shard_layout(model)
        full = gather_full_state_dict({k: v.detach().clone() for k, v in model.state_dict().items() if k in layout},
                                      layout, RankCoords.current(mc.num_layers, mc.num_experts))
        hf = LinearMoEForCausalLM(LinearMoEConfig.from_model_config(mc)).eval()
        hf.load_state_dict(mcore_to_hf(full), strict=True)
        tokens, labels = batch["tokens"].reshape(-1), batch["labels"].reshape(-1)
        offsets = document_offsets(batch["tokens"], EOD).tolist()
        with torch.no_grad():
            reference = torch.cat([
                F.cross_entropy(hf(tokens[start:end][None]).logits[0], labels[start:end], reduction="none")
                for start, end in zip(offsets[:-1], offsets[1:])]).reshape(B, T)
        return dict(reference=reference, **losses)
    finally:
        destroy_parallel()


@pytest.mark.parametrize("context", [1, 2], ids=["sp1", "sp2"])
@pytest.mark.parametrize("mixer", ["gla", "gated_deltanet", "rwkv7"])
def test_packed_documents_equal_separate_runs(mixer, context):
    result = spawn_world(_worker, args=(mixer, context), nprocs=context)
    assert_rel_close("per-token loss of packed documents", result["reference"], result["packed"], 1e-5)
    assert rel_error(result["reference"], result["unpacked"]) > 1e-3, "without offsets documents see each other"
