"""``transformer_config``: ModelConfig fields land in megatron's TransformerConfig; router semantics."""
import pytest
import torch
import torch.nn.functional as F

import linear_moe.model.mixers  # noqa: F401  (fills the mixer registry)
from linear_moe.kernels.testing import assert_rel_close
from linear_moe.model import preset
from linear_moe.model.megatron.config import ROUTERS, transformer_config
from linear_moe.model.megatron.parallel import ParallelSizes


def test_fields_follow_model_config():
    mc = preset("tiny-hybrid", num_shared_experts=2, moe_capacity_factor=1.5, num_kv_heads=2)
    cfg = transformer_config(mc)
    expected = dict(
        num_layers=mc.num_layers, hidden_size=mc.hidden_size, num_attention_heads=mc.num_heads,
        num_query_groups=2, kv_channels=mc.head_dim, ffn_hidden_size=mc.ffn_hidden_size,
        layernorm_epsilon=mc.norm_eps, init_method_std=mc.initializer_range, normalization="RMSNorm",
        gated_linear_unit=True, add_bias_linear=False, num_moe_experts=mc.num_experts,
        moe_router_topk=mc.moe_top_k, moe_ffn_hidden_size=mc.moe_ffn_hidden_size,
        moe_shared_expert_intermediate_size=2 * mc.moe_ffn_hidden_size, moe_aux_loss_coeff=mc.moe_aux_loss_coeff,
        moe_z_loss_coeff=mc.moe_z_loss_coeff, moe_expert_capacity_factor=1.5, moe_token_drop_policy="probs",
        moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=False, params_dtype=torch.float32, bf16=False, sequence_parallel=False,
        use_cpu_initialization=True, recompute_granularity=None,
    )
    assert {key: getattr(cfg, key) for key in expected} == expected
    assert cfg.activation_func is F.silu


def test_dense_only_pattern_has_no_experts():
    assert transformer_config(preset("tiny", layer_pattern="ll")).num_moe_experts is None


def test_tensor_parallel_turns_on_sequence_parallel_and_sets_sizes():
    cfg = transformer_config(preset("tiny"), ParallelSizes(tensor=2, pipeline=2, expert=2, expert_tensor=1),
                             recompute="full")
    assert (cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size, cfg.expert_model_parallel_size,
            cfg.expert_tensor_parallel_size, cfg.sequence_parallel) == (2, 2, 2, 1, True)
    assert (cfg.recompute_granularity, cfg.recompute_method, cfg.recompute_num_layers) == ("full", "uniform", 1)


@pytest.mark.parametrize("bad, match", [
    (dict(model=dict(vocab_size=511), sizes=dict(tensor=2)), "vocab_size=511"),
    (dict(model=dict(num_heads=4), sizes=dict(tensor=8)), "num_heads=4"),
    (dict(model=dict(num_experts=3, moe_top_k=1), sizes=dict(expert=2)), "num_experts=3"),
    (dict(model=dict(num_layers=3, layer_pattern="lll"), sizes=dict(pipeline=2)), "num_layers=3"),
])
def test_bad_layouts_are_rejected(bad, match):
    with pytest.raises(ValueError, match=match):
        transformer_config(preset("tiny", **bad["model"]), ParallelSizes(**bad["sizes"]))


def test_expert_tensor_must_equal_tensor_without_expert_parallel():
    with pytest.raises(ValueError, match="expert_tensor=1 must equal tensor=2"):
        ParallelSizes(tensor=2, expert_tensor=1)
    assert ParallelSizes(tensor=2).expert_tensor == 2


def test_grouped_gemm_needs_the_bf16_flag():
    with pytest.raises(ValueError, match="moe_grouped_gemm=True needs bf16=True"):
        transformer_config(preset("tiny"), moe_grouped_gemm=True)
    cfg = transformer_config(preset("tiny"), moe_grouped_gemm=True, bf16=True)  # fp32 weights, as CPU tests use
    assert (cfg.moe_grouped_gemm, cfg.bf16, cfg.params_dtype) == (True, True, torch.float32)


def test_grouped_gemm_is_opt_in():
    assert transformer_config(preset("tiny")).moe_grouped_gemm is False


def _naive_routing(router, logits_TE, k, bias_E):
    """Independent reference of the three router semantics documented in ModelConfig.moe_router."""
    T, E = logits_TE.shape
    if router == "softmax_topk":  # softmax over all experts, keep the top-k, no renormalisation
        probs = logits_TE.softmax(-1)
        idx = probs.topk(k, -1).indices
        weights = probs.gather(1, idx)
    elif router == "mixtral":  # softmax over the top-k logits
        idx = logits_TE.topk(k, -1).indices
        weights = logits_TE.gather(1, idx).softmax(-1)
    else:  # sigmoid scores, biased selection, unbiased weights renormalised over the k
        scores = logits_TE.sigmoid()
        idx = (scores + bias_E).topk(k, -1).indices
        weights = scores.gather(1, idx)
        weights = weights / weights.sum(-1, keepdim=True)
    dense = torch.zeros(T, E).scatter(1, idx, weights)
    return dense, dense > 0


@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_router_fields_give_the_documented_routing(router):
    from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function

    fields = ROUTERS[router]
    cfg = transformer_config(preset("tiny", moe_router=router, moe_aux_loss_coeff=0.0))
    assert cfg.moe_router_score_function == fields["moe_router_score_function"]
    logits = torch.randn(16, 4)
    bias = torch.tensor([0.5, -0.5, 0.0, 0.25]) if router == "sigmoid_bias" else None
    probs, routing_map = topk_routing_with_score_function(
        logits, 2, use_pre_softmax=cfg.moe_router_pre_softmax, score_function=cfg.moe_router_score_function,
        expert_bias=bias,
    )
    ref_probs, ref_map = _naive_routing(router, logits, 2, bias if bias is not None else 0.0)
    assert torch.equal(routing_map, ref_map)
    assert_rel_close(f"{router} weights", ref_probs, probs, 1e-6)
