"""Capacity dropping: the megatron model (TP = 1, one process) and its Hugging Face export drop the
same assignments, so their logits agree.

Reference: the single-device ``LinearMoEForCausalLM`` on the exported weights, whose MoE layer is
checked against a per-token loop (``tests/model/test_moe.py``). Both keep each expert's
``ceil(T*K/E*c)`` heaviest assignments (megatron's "probs" policy). The same HF weights without a
capacity factor give other logits, so drops did happen. (Under TP/SP, EP or DP each rank applies the
capacity to its own tokens, so only a single process can match the single-device model.)
"""
import pytest
import torch

from dist_support import spawn_world
from linear_moe.kernels.testing import assert_rel_close, rel_error

pytestmark = [pytest.mark.distributed, pytest.mark.xdist_group("dist")]

B, T = 2, 16


def _worker(rank, scratch_dir, router: str):
    import linear_moe.model.mixers  # noqa: F401
    from linear_moe.components.convert.adapter import mcore_to_hf
    from linear_moe.model import preset
    from linear_moe.model.megatron.config import transformer_config
    from linear_moe.model.megatron.gpt import build_gpt_model
    from linear_moe.model.megatron.parallel import ParallelSizes, destroy_parallel, initialize_parallel
    from linear_moe.model.megatron.state_dict import RankCoords, gather_full_state_dict, shard_layout
    from linear_moe.model.modeling import LinearMoEConfig, LinearMoEForCausalLM

    initialize_parallel(ParallelSizes())
    try:
        mc = preset("tiny", layer_pattern="LA", num_layers=2, moe_capacity_factor=0.5, moe_router=router)
        model = build_gpt_model(mc, transformer_config(mc), seed=7).eval()
        layout = shard_layout(model)
        full = gather_full_state_dict({k: v.detach().clone() for k, v in model.state_dict().items() if k in layout},
                                      layout, RankCoords.current(mc.num_layers, mc.num_experts))
        tokens_BT = torch.randint(0, mc.vocab_size, (B, T), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            megatron_logits = model(tokens_BT, torch.arange(T).expand(B, T), None)
        logits = {}
        for name, capacity_factor in (("capacity", 0.5), ("dropless", None)):
            hf_config = LinearMoEConfig.from_model_config(mc.replace(moe_capacity_factor=capacity_factor))
            hf = LinearMoEForCausalLM(hf_config).eval()
            hf.load_state_dict(mcore_to_hf(full), strict=True)
            with torch.no_grad():
                logits[name] = hf(tokens_BT).logits
        return dict(megatron=megatron_logits, **logits)
    finally:
        destroy_parallel()


@pytest.mark.parametrize("router", ["softmax_topk", "mixtral", "sigmoid_bias"])
def test_megatron_and_hf_drop_the_same_assignments(router):
    result = spawn_world(_worker, args=(router,), nprocs=1)
    assert result["megatron"].shape == result["capacity"].shape == (B, T, result["capacity"].shape[-1])
    assert_rel_close("logits with capacity 0.5", result["capacity"], result["megatron"], 1e-5)
    assert rel_error(result["dropless"], result["capacity"]) > 1e-3, "capacity 0.5 must drop assignments"
