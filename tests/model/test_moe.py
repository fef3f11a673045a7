"""MoE layer and SwiGLU against independent references: a per-token Python loop, numpy counts,
transformers' LlamaMLP, and the config's own validation."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from linear_moe.kernels.testing import assert_rel_close
from linear_moe.model.config import ModelConfig
from linear_moe.model.mixers import MIXERS, Mixer
from linear_moe.model.mlp import SwiGLU
from linear_moe.model.moe import ROUTERS, MoELayer, load_balancing_loss, router_z_loss, sequence_load_balancing_loss

STUB_MIXER = "_moe_test_stub"
SHARED = {"none": (0, False), "shared": (2, False), "shared-gated": (1, True)}


@pytest.fixture
def make_config(monkeypatch):
    """Tiny one-layer MoE ``ModelConfig``; a stub mixer is registered so no mixer module is needed."""
    monkeypatch.setitem(MIXERS, STUB_MIXER, Mixer)

    def make(**overrides) -> ModelConfig:
        fields = dict(num_layers=1, layer_pattern="L", hidden_size=8, num_heads=2, lsm_mixer=STUB_MIXER,
                      num_experts=4, moe_top_k=2, moe_ffn_hidden_size=6, initializer_range=0.5,
                      moe_aux_loss_coeff=0.3, moe_z_loss_coeff=0.2)
        return ModelConfig(**{**fields, **overrides})

    return make


# ---------------------------------------------------------------------------- reference
def _reference_route(router_name: str, logits_E: torch.Tensor, bias_E: torch.Tensor, k: int):
    """One token's experts (Python sort, descending) and weights, straight from the definitions."""
    values = logits_E.detach().tolist()
    if router_name == "softmax_topk":
        probs_E = torch.exp(logits_E) / torch.exp(logits_E).sum()
        idx = sorted(range(len(values)), key=lambda e: -values[e])[:k]
        return idx, [probs_E[e] for e in idx], probs_E
    if router_name == "mixtral":
        idx = sorted(range(len(values)), key=lambda e: -values[e])[:k]
        exp_k = [torch.exp(logits_E[e]) for e in idx]
        return idx, [w / sum(exp_k) for w in exp_k], torch.exp(logits_E) / torch.exp(logits_E).sum()
    if router_name == "sigmoid_bias":
        scores_E = 1.0 / (1.0 + torch.exp(-logits_E))
        biased = [s + b for s, b in zip(scores_E.detach().tolist(), bias_E.tolist())]
        idx = sorted(range(len(values)), key=lambda e: -biased[e])[:k]
        chosen = [scores_E[e] for e in idx]
        return idx, [s / sum(chosen) for s in chosen], scores_E / scores_E.sum()
    raise AssertionError(router_name)


def _silu(x):
    return x / (1.0 + torch.exp(-x))


def reference_moe(layer: MoELayer, x_BTD: torch.Tensor, capacity: int | None = None):
    """Dense per-token loop: ``y_t = sum_j w_tj * expert_{e_tj}(x_t) + shared(x_t)``.

    With ``capacity``, each expert keeps the ``capacity`` assignments of largest weight (equal
    weights: the earlier token) and the others contribute 0.
    Returns ``(y_BTD, aux_loss, z_loss, routed_counts, dropped)`` with the layer's coefficients.
    """
    router, experts = layer.router, layer.experts
    E, k = layer.num_experts, layer.top_k
    bias_E = getattr(router, "expert_bias_E", torch.zeros(E))
    x_TD = x_BTD.reshape(-1, x_BTD.shape[-1])
    routes, probs, z_terms = [], [], []
    for x_D in x_TD:
        logits_E = torch.stack([(router.weight[e] * x_D).sum() for e in range(E)])
        idx, weights, probs_E = _reference_route(router.registry_name, logits_E, bias_E, k)
        routes.append(list(zip(idx, weights)))
        probs.append(probs_E)
        z_terms.append(torch.log(torch.exp(logits_E).sum()) ** 2)
    assignments = [(float(w.detach()), t, j, e) for t, route in enumerate(routes) for j, (e, w) in enumerate(route)]
    by_expert = {e: sorted((a for a in assignments if a[3] == e), key=lambda a: (-a[0], a[1], a[2])) for e in range(E)}
    kept = {(t, j) for e in range(E) for _, t, j, _ in by_expert[e][:capacity]}  # [:None] keeps all
    counts = [len(by_expert[e]) for e in range(E)]  # routed (biased selection): the reported demand
    rows = []
    for t, x_D in enumerate(x_TD):
        y_D = torch.zeros_like(x_D)
        for j, (e, w) in enumerate(routes[t]):
            if (t, j) in kept:
                h_F = _silu(x_D @ experts.gate_EDF[e]) * (x_D @ experts.up_EDF[e])
                y_D = y_D + w * (h_F @ experts.down_EFD[e])
        if layer.shared_experts is not None:
            mlp = layer.shared_experts
            shared_D = (_silu(mlp.gate_proj.weight @ x_D) * (mlp.up_proj.weight @ x_D)) @ mlp.down_proj.weight.T
            if layer.shared_expert_gate is not None:
                shared_D = shared_D / (1.0 + torch.exp(-(layer.shared_expert_gate.weight[0] @ x_D)))
            y_D = y_D + shared_D
        rows.append(y_D)
    T = len(rows)
    # the balance loss counts each token's top-k probabilities: no selection bias
    unbiased = [sorted(range(E), key=lambda e: -float(p[e]))[:k] for p in probs]

    def balance(tokens: range) -> torch.Tensor:
        group_counts = [sum(e in unbiased[t] for t in tokens) for e in range(E)]
        return E * sum(group_counts[e] / (len(tokens) * k) * torch.stack([probs[t][e] for t in tokens]).mean()
                       for e in range(E))

    B, L = x_BTD.shape[:2]  # seq_aux_loss: one group per sequence, averaged
    groups = [range(b * L, (b + 1) * L) for b in range(B)] if layer.aux_loss_type == "seq_aux_loss" else [range(T)]
    aux = sum(balance(tokens) for tokens in groups) / len(groups)
    z = torch.stack(z_terms).mean()
    return (torch.stack(rows).reshape(x_BTD.shape), layer.aux_loss_coeff * aux, layer.z_loss_coeff * z,
            counts, T * k - len(kept))


def _grads(loss, tensors):
    grads = torch.autograd.grad(loss, tensors, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(tensors, grads)]


def _check_against_reference(layer: MoELayer, x_BTD: torch.Tensor, capacity: int | None):
    x_BTD = x_BTD.clone().requires_grad_(True)
    tensors = [x_BTD] + [p for _, p in layer.named_parameters()]
    names = ["x"] + [n for n, _ in layer.named_parameters()]
    dy_BTD = torch.randn_like(x_BTD)

    y_BTD, stats = layer(x_BTD)
    grads = _grads((y_BTD * dy_BTD).sum() + stats.aux_loss + stats.z_loss, tensors)
    ref_y, ref_aux, ref_z, ref_counts, ref_dropped = reference_moe(layer, x_BTD, capacity)
    ref_grads = _grads((ref_y * dy_BTD).sum() + ref_aux + ref_z, tensors)

    assert_rel_close("y", ref_y, y_BTD, 1e-5)
    assert_rel_close("aux_loss", ref_aux, stats.aux_loss, 1e-5)
    assert_rel_close("z_loss", ref_z, stats.z_loss, 1e-5)
    assert stats.tokens_per_expert.dtype == torch.long
    assert stats.tokens_per_expert.tolist() == ref_counts
    assert int(stats.dropped) == ref_dropped
    for name, ref_g, g in zip(names, ref_grads, grads):
        assert_rel_close(f"grad {name}", ref_g, g, 1e-5)
    return stats


# ---------------------------------------------------------------------------- tests
@pytest.mark.parametrize("aux_loss_type", ["aux_loss", "seq_aux_loss"])
@pytest.mark.parametrize("shared", list(SHARED))
@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_layer_matches_per_token_loop(make_config, router, shared, aux_loss_type):
    num_shared, gated = SHARED[shared]
    layer = MoELayer(make_config(moe_router=router, num_shared_experts=num_shared, shared_expert_gate=gated,
                                 moe_aux_loss_type=aux_loss_type))
    if router == "sigmoid_bias":  # a nonzero balancing bias must steer selection in both paths
        layer.router.expert_bias_E.copy_(0.2 * torch.randn(4))
    stats = _check_against_reference(layer, torch.randn(2, 5, 8), capacity=None)
    assert int(stats.dropped) == 0


@pytest.mark.parametrize("capacity_factor", [0.5, 1.0])
@pytest.mark.parametrize("router", ["softmax_topk", "mixtral"])
def test_capacity_drops_match_heaviest_first_loop(make_config, router, capacity_factor):
    layer = MoELayer(make_config(moe_router=router, moe_capacity_factor=capacity_factor, num_shared_experts=1))
    with torch.no_grad():  # skew the router so that some experts overflow at either factor
        layer.router.weight[0] += 1.0
    x_BTD = torch.randn(2, 6, 8) + 0.5
    capacity = math.ceil(capacity_factor * 12 * 2 / 4)
    stats = _check_against_reference(layer, x_BTD, capacity)
    assert int(stats.dropped) > 0


def test_capacity_keeps_the_heaviest_assignments_not_the_earliest():
    """Expert 0 gets four tokens with rising weights and capacity 2: the last two stay. Equal weights
    keep the earlier token."""
    from linear_moe.model.moe import dispatch

    idx_TK = torch.tensor([[0], [0], [0], [0], [1]])
    plan = dispatch(idx_TK, torch.tensor([[0.1], [0.2], [0.3], [0.4], [0.5]]), num_experts=2, capacity=2)
    assert plan.token_N.tolist() == [2, 3, 4] and plan.expert_N.tolist() == [0, 0, 1]
    assert plan.kept_per_expert_E.tolist() == [2, 1] and plan.routed_per_expert_E.tolist() == [4, 1]
    assert int(plan.dropped) == 2
    tied = dispatch(idx_TK, torch.ones(5, 1), num_experts=2, capacity=2)
    assert tied.token_N.tolist() == [0, 1, 4]


def _numpy_balance(probs_TE: np.ndarray, k: int) -> float:
    """``E * sum_e f_e P_e`` with ``f_e`` from each token's k largest probabilities, counted by hand."""
    T, E = probs_TE.shape
    counts = [0] * E
    for row in probs_TE:
        for e in np.argsort(-row)[:k]:
            counts[e] += 1
    return E * sum(counts[e] / (T * k) * probs_TE[:, e].mean() for e in range(E))


def test_balance_losses_and_z_loss_match_numpy_counts():
    logits_BTE = np.array([[[2.0, 0.5, -1.0], [0.1, 0.3, 0.2]], [[-0.5, 1.5, 1.0], [3.0, -2.0, 0.0]]])
    probs_BTE = np.exp(logits_BTE) / np.exp(logits_BTE).sum(-1, keepdims=True)
    probs = torch.tensor(probs_BTE, dtype=torch.float32)
    expected_aux = _numpy_balance(probs_BTE.reshape(4, 3), k=2)  # the micro-batch as one group
    expected_seq = np.mean([_numpy_balance(row, k=2) for row in probs_BTE])  # each sequence, averaged
    expected_z = np.mean([np.log(np.exp(row).sum()) ** 2 for row in logits_BTE.reshape(4, 3)])

    assert_rel_close("aux_loss", torch.tensor(expected_aux), load_balancing_loss(probs, 2), 1e-6)
    assert_rel_close("seq_aux_loss", torch.tensor(expected_seq), sequence_load_balancing_loss(probs, 2), 1e-6)
    assert not np.isclose(expected_aux, expected_seq)  # the two groupings differ on this batch
    z = router_z_loss(torch.tensor(logits_BTE.reshape(4, 3), dtype=torch.float32))
    assert_rel_close("z_loss", torch.tensor(expected_z), z, 1e-6)


def test_sigmoid_bias_update_follows_sign_of_load_gap(make_config):
    layer = MoELayer(make_config(moe_router="sigmoid_bias", moe_bias_update_rate=0.01))
    tokens_per_expert = torch.tensor([10, 2, 5, 3])
    layer.update_bias(tokens_per_expert)
    layer.update_bias(tokens_per_expert)
    expected = 2 * 0.01 * np.sign(tokens_per_expert.numpy().mean() - tokens_per_expert.numpy())
    assert_rel_close("expert_bias_E", torch.tensor(expected), layer.router.expert_bias_E, 1e-6)


def test_sigmoid_bias_stays_fp32_when_layer_is_cast(make_config):
    layer = MoELayer(make_config(moe_router="sigmoid_bias", moe_bias_update_rate=1e-3)).to(torch.bfloat16)
    assert layer.router.weight.dtype == torch.bfloat16
    layer.router.expert_bias_E.fill_(0.5)
    layer.update_bias(torch.tensor([4, 0, 0, 0]))
    expected = 0.5 + 1e-3 * np.sign(1.0 - np.array([4.0, 0.0, 0.0, 0.0]))  # not representable in bf16
    assert_rel_close("expert_bias_E", torch.tensor(expected), layer.router.expert_bias_E, 1e-7)


def test_sigmoid_bias_updates_reduce_imbalance(make_config):
    layer = MoELayer(make_config(moe_router="sigmoid_bias", moe_bias_update_rate=0.02))
    with torch.no_grad():
        layer.router.weight[0] += 1.0
    x_BTD = torch.randn(1, 32, 8) + 0.5
    with torch.no_grad():
        first = layer(x_BTD)[1].tokens_per_expert
        for _ in range(40):
            layer.update_bias(layer(x_BTD)[1].tokens_per_expert)
        last = layer(x_BTD)[1].tokens_per_expert
    assert int(first.max() - first.min()) >= 16  # the skew is real
    assert int(last.max() - last.min()) <= int(first.max() - first.min()) // 2


def test_sigmoid_bias_changes_selection_not_weights(make_config):
    layer = MoELayer(make_config(moe_router="sigmoid_bias"))
    x_TD = torch.randn(10, 8)
    with torch.no_grad():
        before = layer.router(x_TD)
        layer.router.expert_bias_E[3] = 10.0  # far above any score gap: every token now picks expert 3
        after = layer.router(x_TD)
    assert (after.topk_idx_TK == 3).any(dim=-1).all()
    assert not torch.equal(before.topk_idx_TK, after.topk_idx_TK)
    scores_TE = torch.sigmoid(x_TD @ layer.router.weight.detach().T)
    for routing in (before, after):  # weights are the unbiased scores of the chosen experts, normalised
        chosen_TK = scores_TE.gather(1, routing.topk_idx_TK)
        assert_rel_close("topk_weight", chosen_TK / chosen_TK.sum(-1, keepdim=True), routing.topk_weight_TK, 1e-6)


def test_top_k_above_num_experts_rejected_by_config(make_config):
    with pytest.raises(ValueError, match="moe_top_k"):
        make_config(num_experts=4, moe_top_k=5)


def test_every_registered_router_has_a_megatron_mapping():
    from linear_moe.model.megatron.config import ROUTERS as MEGATRON_ROUTERS

    assert sorted(ROUTERS) == sorted(MEGATRON_ROUTERS)


def test_swiglu_matches_transformers_llama_mlp():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    mlp = SwiGLU(8, 12)
    llama = LlamaConfig(hidden_size=8, intermediate_size=12, num_attention_heads=2, num_key_value_heads=2,
                        hidden_act="silu", mlp_bias=False)
    reference = LlamaMLP(llama)
    reference.load_state_dict(mlp.state_dict())
    x_BTD = torch.randn(2, 3, 8)
    assert_rel_close("swiglu", reference(x_BTD), mlp(x_BTD), 1e-6)
