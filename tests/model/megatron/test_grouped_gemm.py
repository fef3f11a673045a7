"""Megatron's grouped-GEMM experts (``GroupedMLP``) with our ``gmm`` op, against the per-expert build.

References: per-row matmuls for :func:`naive_gmm` (forward and backward, relative error 1e-6);
:func:`naive_gmm` for ``torch._grouped_mm`` (1e-6); the ``SequentialMLP`` build of the same
ModelConfig and seed for the ``GroupedMLP`` build (initial full state ``torch.equal``; logits, per-token
loss and gradients, mapped to per-expert names by ``gather_full_state_dict``, relative error 1e-5);
the grouped megatron logits for the Hugging Face export (1e-5).

Why fp32 with ``bf16=True`` (``GROUPED_GEMM_CONFIG``): GroupedMLP asserts ``config.bf16`` in its
forward, and bf16 CPU matmuls are too coarse for an equivalence test. In megatron-core 0.16.1
``config.bf16`` is read by GroupedMLP's assert, ``Float16Module`` (which we never apply: parameters
stay in ``params_dtype``, fp32 here), megatron's ``DotProductAttention`` (replaced by our mixers),
megatron's optimizer (the tests use torch's) and config checks for options we leave off. So the flag
only lifts the assert; ``test_bf16_flag_alone_changes_nothing_on_cpu`` checks that the per-expert
model's logits are bit-identical with and without it. The layer's own weights and GEMMs are fp32.
"""
import os

import pytest
import torch

from dist_support import spawn_world
from linear_moe.kernels.testing import assert_rel_close
from linear_moe.model.megatron.grouped_gemm import (
    GMM_PACKAGE,
    gmm,
    install_gmm,
    naive_gmm,
    torch_grouped_mm_gmm,
    torch_grouped_mm_supported,
)
from megatron_dist_harness import GROUPED_GEMM_CONFIG

GMM_RATIO = 1e-6
MODEL_RATIO = 1e-5
# hybrid (GLA + softmax attention), both layers MoE; shared expert with its gate, sigmoid-bias router
MODEL = dict(layer_pattern="LA", num_layers=2, num_shared_experts=1, shared_expert_gate=True,
             moe_router="sigmoid_bias")
SEED = 7  # not build_gpt_model's default, which the converter's model below uses
B, T = 2, 16


# ---------------------------------------------------------------------- the gmm op
def _per_row_reference(a_TK, b_EKN, sizes, trans_b):
    """``out[t] = a[t] @ b[expert of t]``: each row against its expert's matrix, gathered per row."""
    weights = b_EKN.transpose(-2, -1) if trans_b else b_EKN
    expert_T = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    return torch.bmm(a_TK.unsqueeze(1), weights[expert_T]).squeeze(1)


def _gmm_case(sizes, K, N, trans_b, seed=0):
    generator = torch.Generator().manual_seed(seed)
    a_TK = torch.randn(sum(sizes), K, generator=generator, requires_grad=True)
    shape = (len(sizes), N, K) if trans_b else (len(sizes), K, N)
    b_EKN = torch.randn(shape, generator=generator, requires_grad=True)
    grad_TN = torch.randn(sum(sizes), N, generator=generator)
    return a_TK, b_EKN, grad_TN


def _forward_backward(fn, a_TK, b_EKN, grad_TN, *args):
    a, b = a_TK.detach().clone().requires_grad_(), b_EKN.detach().clone().requires_grad_()
    out = fn(a, b, *args)
    out.backward(grad_TN)
    return out.detach(), a.grad, b.grad


GMM_CASES = {  # id -> (rows per expert, K, N, trans_b); zero-token experts included
    "E4-K8-N12": ([3, 0, 5, 2], 8, 12, False),
    "E3-K12-N8-transb": ([4, 1, 0], 12, 8, True),
    "E1-K4-N4": ([7], 4, 4, False),
    "E4-K16-N8-empty": ([0, 0, 0, 0], 16, 8, False),
}


@pytest.mark.parametrize("sizes, K, N, trans_b", GMM_CASES.values(), ids=GMM_CASES.keys())
def test_naive_gmm_matches_per_row_matmuls_forward_and_backward(sizes, K, N, trans_b):
    a_TK, b_EKN, grad_TN = _gmm_case(sizes, K, N, trans_b)
    reference = _forward_backward(_per_row_reference, a_TK, b_EKN, grad_TN, sizes, trans_b)
    for batch_sizes in (torch.tensor(sizes), sizes):  # megatron passes a tensor; lists work too
        actual = _forward_backward(naive_gmm, a_TK, b_EKN, grad_TN, batch_sizes, trans_b)
        for name, ref, act in zip(("out", "grad a", "grad b"), reference, actual):
            assert_rel_close(name, ref, act, GMM_RATIO, allow_empty=sum(sizes) == 0)  # no rows: only grad b has any


def _torch_grouped_mm_runs_on_cpu() -> bool:
    try:
        torch_grouped_mm_gmm(torch.zeros(2, 4), torch.zeros(1, 4, 4), torch.tensor([2]))
        return True
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


#: gmm never sends an empty ``a`` to torch._grouped_mm (its backward rejects one)
GROUPED_MM_CASES = {name: case for name, case in GMM_CASES.items() if sum(case[0])}


@pytest.mark.skipif(not _torch_grouped_mm_runs_on_cpu(), reason="this torch has no CPU torch._grouped_mm")
@pytest.mark.parametrize("sizes, K, N, trans_b", GROUPED_MM_CASES.values(), ids=GROUPED_MM_CASES.keys())
def test_torch_grouped_mm_matches_naive_forward_and_backward(sizes, K, N, trans_b):
    """The CUDA fast path's code (offsets, transposes, autograd) run through torch's CPU kernel
    (fp32, 16-byte aligned K and N); also under ``out.sum()``, whose gradient has stride 0."""
    a_TK, b_EKN, grad_TN = _gmm_case(sizes, K, N, trans_b)
    batch_sizes = torch.tensor(sizes)
    reference = _forward_backward(naive_gmm, a_TK, b_EKN, grad_TN, batch_sizes, trans_b)
    actual = _forward_backward(torch_grouped_mm_gmm, a_TK, b_EKN, grad_TN, batch_sizes, trans_b)
    for name, ref, act in zip(("out", "grad a", "grad b"), reference, actual):
        assert_rel_close(name, ref, act, GMM_RATIO)
    b = b_EKN.detach().clone().requires_grad_()
    torch_grouped_mm_gmm(a_TK.detach(), b, batch_sizes, trans_b).sum().backward()
    naive_b = b_EKN.detach().clone().requires_grad_()
    naive_gmm(a_TK.detach(), naive_b, batch_sizes, trans_b).sum().backward()
    assert_rel_close("grad b of out.sum()", naive_b.grad, b.grad, GMM_RATIO)


def test_gmm_uses_the_reference_on_cpu():
    a_TK, b_EKN, _ = _gmm_case([2, 3], 8, 8, False)
    assert not torch_grouped_mm_supported(a_TK, b_EKN)
    assert not torch_grouped_mm_supported(a_TK.bfloat16(), b_EKN.bfloat16())
    assert torch.equal(gmm(a_TK, b_EKN, torch.tensor([2, 3])), naive_gmm(a_TK, b_EKN, torch.tensor([2, 3])))


def test_gmm_rejects_bad_shapes():
    a_TK, b_EKN = torch.randn(5, 8), torch.randn(2, 8, 4)
    with pytest.raises(ValueError, match=r"expected a \(T, K\) and b \(E, K, N\)"):
        gmm(a_TK, b_EKN[0], torch.tensor([2, 3]))
    with pytest.raises(ValueError, match=r"disagree on K; expected a of shape \(T, 4\)"):
        gmm(a_TK, b_EKN, torch.tensor([2, 3]), trans_b=True)
    with pytest.raises(ValueError, match="batch_sizes has 3 entries, expected one per expert"):
        gmm(a_TK, b_EKN, torch.tensor([2, 3, 0]))
    with pytest.raises(ValueError, match="batch_sizes sum to 4, expected the 5 rows of a"):
        gmm(a_TK, b_EKN, torch.tensor([2, 2]))


def test_install_gmm_makes_grouped_mlp_available():
    from megatron.core.transformer.moe import grouped_gemm_util

    backend = install_gmm()
    assert backend == install_gmm()  # idempotent
    assert grouped_gemm_util.grouped_gemm_is_available()
    if backend == "linear_moe":
        assert grouped_gemm_util.ops is GMM_PACKAGE.ops and grouped_gemm_util.ops.gmm is gmm


# ---------------------------------------------------------------------- GroupedMLP vs SequentialMLP
#: build name -> transformer_config overrides
BUILDS = {"sequential": {}, "sequential_bf16_flag": dict(bf16=True), "grouped": GROUPED_GEMM_CONFIG}


def _run(model_config, config_kwargs, tokens_BT, labels_BT):
    """Build (seed SEED) and run one forward/backward; everything full-model, per-expert names."""
    from linear_moe.model.megatron.config import transformer_config
    from linear_moe.model.megatron.gpt import build_gpt_model
    from linear_moe.model.megatron.state_dict import RankCoords, gather_full_state_dict, shard_layout

    config = transformer_config(model_config, **config_kwargs)
    model = build_gpt_model(model_config, config, seed=SEED)
    layout = shard_layout(model)
    coords = RankCoords.current(model_config.num_layers, model_config.num_experts)
    initial = gather_full_state_dict({k: v.detach().clone() for k, v in model.state_dict().items() if k in layout},
                                     layout, coords)
    position_ids_BT = torch.arange(T).expand(B, T)
    with torch.no_grad():
        logits_BTV = model(tokens_BT, position_ids_BT, None)
    loss_BT = model(tokens_BT, position_ids_BT, None, labels=labels_BT)
    loss_BT.mean().backward()
    grads = gather_full_state_dict({name: p.grad for name, p in model.named_parameters() if p.grad is not None},
                                   layout, coords)
    modules = {type(m).__name__ for m in model.modules()}
    return dict(initial=initial, logits=logits_BTV, loss=loss_BT.detach(), grads=grads, model=model,
                expert_modules=sorted(modules & {"GroupedMLP", "SequentialMLP"}))


def _checkpoint_into_sequential_model(grouped_model, model_config, directory):
    """Save the grouped model as a dist checkpoint; load it into the converter's per-expert full model."""
    from linear_moe.components.convert import megatron_io

    megatron_io.save_dist_checkpoint(grouped_model, directory)
    model = megatron_io.build_full_model(model_config)  # SequentialMLP on CPU, initialised with another seed
    assert not model.config.moe_grouped_gemm
    before = {name: tensor.clone() for name, tensor in megatron_io.tensor_state_dict(model).items()}
    megatron_io.load_dist_checkpoint(model, directory)
    return before, megatron_io.tensor_state_dict(model)


def _worker(rank, scratch_dir):
    import linear_moe.model.mixers  # noqa: F401  (fills the mixer registry)
    from linear_moe.components.convert.adapter import mcore_to_hf
    from linear_moe.model import preset
    from linear_moe.model.megatron.parallel import ParallelSizes, destroy_parallel, initialize_parallel

    initialize_parallel(ParallelSizes())
    try:
        model_config = preset("tiny", **MODEL)
        tokens = torch.randint(0, model_config.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(0))
        runs = {name: _run(model_config, kwargs, tokens[:, :-1], tokens[:, 1:]) for name, kwargs in BUILDS.items()}
        before_load, checkpoint_state = _checkpoint_into_sequential_model(
            runs["grouped"]["model"], model_config, os.path.join(scratch_dir, "checkpoint"))
    finally:
        destroy_parallel()
    for run in runs.values():
        del run["model"]
    return dict(runs=runs, tokens=tokens[:, :-1], before_load=before_load, checkpoint_state=checkpoint_state,
                hf_state=mcore_to_hf(checkpoint_state))


@pytest.fixture(scope="module")
def builds():
    return spawn_world(_worker, nprocs=1)


@pytest.mark.distributed
@pytest.mark.xdist_group("dist")
def test_bf16_flag_alone_changes_nothing_on_cpu(builds):
    plain, flagged = builds["runs"]["sequential"], builds["runs"]["sequential_bf16_flag"]
    assert torch.equal(plain["logits"], flagged["logits"])
    assert torch.equal(plain["loss"], flagged["loss"])


@pytest.mark.distributed
@pytest.mark.xdist_group("dist")
def test_grouped_initial_state_equals_sequential(builds):
    sequential, grouped = builds["runs"]["sequential"], builds["runs"]["grouped"]
    assert (sequential["expert_modules"], grouped["expert_modules"]) == (["SequentialMLP"], ["GroupedMLP"])
    assert set(grouped["initial"]) == set(sequential["initial"])
    different = [name for name, tensor in sequential["initial"].items()
                 if not torch.equal(tensor, grouped["initial"][name])]
    assert not different, different


@pytest.mark.distributed
@pytest.mark.xdist_group("dist")
def test_grouped_matches_sequential_logits_loss_and_grads(builds):
    sequential, grouped = builds["runs"]["sequential"], builds["runs"]["grouped"]
    assert_rel_close("logits", sequential["logits"], grouped["logits"], MODEL_RATIO)
    assert_rel_close("per-token loss", sequential["loss"], grouped["loss"], MODEL_RATIO)
    assert set(grouped["grads"]) == set(sequential["grads"])
    assert any(".local_experts.3.linear_fc1." in name for name in grouped["grads"])
    for name, grad in sequential["grads"].items():
        assert_rel_close(f"grad {name}", grad, grouped["grads"][name], MODEL_RATIO)


@pytest.mark.distributed
@pytest.mark.xdist_group("dist")
def test_grouped_dist_checkpoint_loads_into_per_expert_converter_model(builds):
    initial = builds["runs"]["grouped"]["initial"]
    state = builds["checkpoint_state"]
    assert set(state) == set(initial)
    expert = "decoder.layers.0.mlp.experts.local_experts.1.linear_fc1.weight"
    assert not torch.equal(builds["before_load"][expert], initial[expert])  # the load, not the init, sets it
    different = [name for name, tensor in initial.items() if not torch.equal(tensor, state[name])]
    assert not different, different


@pytest.mark.distributed
@pytest.mark.xdist_group("dist")
def test_grouped_hf_export_matches_megatron_logits(builds):
    import linear_moe.model.mixers  # noqa: F401
    from linear_moe.model import preset
    from linear_moe.model.modeling import LinearMoEConfig, LinearMoEForCausalLM

    model = LinearMoEForCausalLM(LinearMoEConfig.from_model_config(preset("tiny", **MODEL))).eval()
    model.load_state_dict(builds["hf_state"], strict=True)
    with torch.no_grad():
        logits = model(builds["tokens"]).logits
    assert_rel_close("HF logits vs grouped megatron", builds["runs"]["grouped"]["logits"], logits, MODEL_RATIO)
