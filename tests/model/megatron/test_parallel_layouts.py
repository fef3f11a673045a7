"""TP / EP / PP / DP layouts of the megatron model against the one-process reference, over 3 AdamW steps.

The reference is the TP = PP = EP = 1 model trained on the whole batch; each layout starts from its
initial weights (sharded with ``shard_state_dict``) and its gradients and weights are gathered back
(``gather_full_state_dict``). Tolerances, fp32, relative RMS error: losses 1e-5; step-1 gradients
and final parameters 1e-4 (layouts only reorder floating-point sums). One spawned 2-rank world runs
the reference and all layouts of one model. Grouped-GEMM layouts (megatron's GroupedMLP, our gmm op)
are held to the same per-expert reference: their packed expert weights gather to per-expert names.
"""
import pytest

from linear_moe.kernels.testing import assert_rel_close
from megatron_dist_harness import GROUPED_GEMM_CONFIG, run_layouts

pytestmark = [pytest.mark.distributed, pytest.mark.xdist_group("dist")]

LOSS_RATIO = 1e-5
GRAD_RATIO = 1e-4

# Megatron computes the load-balancing loss per micro-batch on each DP rank (a product of two batch
# means), so split-data DP equals DP=1 only without it (the GLA model trains with z-loss but no aux
# loss) or with the sequence-wise loss, a mean over sequences (seq_balance_dp2_runs).
GLA_MODEL = dict(layer_pattern="lL", num_layers=2, lsm_mixer="gla", moe_aux_loss_coeff=0.0)
DELTANET_MODEL = dict(layer_pattern="ll", num_layers=2, lsm_mixer="deltanet")
HYBRID_MOE_MODEL = dict(layer_pattern="LA", num_layers=2, lsm_mixer="gla", moe_aux_loss_coeff=1e-2, moe_z_loss_coeff=1e-3)
RWKV7_MODEL = dict(layer_pattern="ll", num_layers=2, lsm_mixer="rwkv7")  # value residual: layer 1 reads layer 0's v
# Mixture-of-Memories: per-memory projections and short convs, each sharded by heads
MOM_MODELS = {mixer: dict(layer_pattern="ll", num_layers=2, lsm_mixer=mixer) for mixer in ("mom_gla", "mom_gated_deltanet")}


@pytest.fixture(scope="module")
def gla_runs():
    return run_layouts(GLA_MODEL, dict(tp2=dict(sizes=dict(tensor=2)), pp2=dict(sizes=dict(pipeline=2)), dp2=dict(sizes={}),
                                       tp2_full_recompute=dict(sizes=dict(tensor=2), config=dict(recompute="full")),
                                       tp2_selective_recompute=dict(sizes=dict(tensor=2),
                                                                    config=dict(recompute="selective"))))


@pytest.fixture(scope="module")
def deltanet_runs():
    return run_layouts(DELTANET_MODEL, dict(tp2=dict(sizes=dict(tensor=2))))


@pytest.fixture(scope="module")
def rwkv7_runs():
    return run_layouts(RWKV7_MODEL, dict(tp2=dict(sizes=dict(tensor=2)), pp2=dict(sizes=dict(pipeline=2)),
                                         tp2_selective_recompute=dict(sizes=dict(tensor=2),
                                                                      config=dict(recompute="selective"))))


@pytest.fixture(scope="module", params=sorted(MOM_MODELS))
def mom_runs(request):
    return run_layouts(MOM_MODELS[request.param], dict(tp2=dict(sizes=dict(tensor=2))))


@pytest.fixture(scope="module")
def hybrid_moe_runs():
    # EP=2 leaves DP=2; both DP ranks see the whole batch so the aux loss matches the reference.
    return run_layouts(HYBRID_MOE_MODEL, dict(
        tp2=dict(sizes=dict(tensor=2)), ep2=dict(sizes=dict(expert=2), replicate_data=True),
        tp2_grouped=dict(sizes=dict(tensor=2), config=GROUPED_GEMM_CONFIG),
        ep2_grouped=dict(sizes=dict(expert=2), replicate_data=True, config=GROUPED_GEMM_CONFIG),
    ))


@pytest.fixture(scope="module")
def hybrid_moe_tp2_ep2_runs():
    # 4 ranks: TP=2 x EP=2 leaves DP=2 (replicated data, for the aux loss). Under TP the alltoall
    # dispatcher all-gathers each rank's tokens in uneven counts: gloo needs cpu_compat's patch.
    return run_layouts(HYBRID_MOE_MODEL, dict(tp2_ep2=dict(sizes=dict(tensor=2, expert=2), replicate_data=True)),
                       world_size=4)


@pytest.fixture(scope="module")
def seq_balance_dp2_runs():
    # The sequence-wise balance loss is a mean over sequences, so split-data DP=2 equals one process
    return run_layouts(dict(HYBRID_MOE_MODEL, moe_aux_loss_type="seq_aux_loss"), dict(dp2=dict(sizes={})))


def check_matches_reference(runs, layout_name):
    reference, layout = runs["reference"], runs[layout_name]
    assert not isinstance(layout, str), f"{layout_name} failed in the worker:\n{layout}"
    assert set(layout["initial"]) == set(reference["initial"]), "sharding lost or renamed tensors"
    for name, tensor in reference["initial"].items():
        assert_rel_close(f"initial {name}", tensor, layout["initial"][name], 0.0)
    assert set(layout["grads"]) == set(reference["grads"])
    for name, grad in reference["grads"].items():
        assert_rel_close(f"step-1 grad {name}", grad, layout["grads"][name], GRAD_RATIO)
    assert_rel_close("losses", reference["losses"], layout["losses"], LOSS_RATIO)
    for name, param in reference["params"].items():
        assert_rel_close(f"step-3 param {name}", param, layout["params"][name], GRAD_RATIO)


def test_tp2_matches_tp1_loss_and_grads_gla(gla_runs):
    check_matches_reference(gla_runs, "tp2")


def test_tp2_matches_tp1_loss_and_grads_mixture_of_memories(mom_runs):
    check_matches_reference(mom_runs, "tp2")


def test_pp2_matches_pp1_loss_and_grads(gla_runs):
    check_matches_reference(gla_runs, "pp2")


def test_dp2_matches_dp1_loss_and_grads(gla_runs):
    check_matches_reference(gla_runs, "dp2")


def test_tp2_with_full_recompute_matches_tp1_loss_and_grads(gla_runs):
    check_matches_reference(gla_runs, "tp2_full_recompute")


def test_tp2_with_selective_recompute_matches_tp1_loss_and_grads(gla_runs):
    check_matches_reference(gla_runs, "tp2_selective_recompute")


def test_dp2_matches_dp1_with_the_sequence_balance_loss(seq_balance_dp2_runs):
    check_matches_reference(seq_balance_dp2_runs, "dp2")


def test_tp2_matches_tp1_loss_and_grads_deltanet(deltanet_runs):
    check_matches_reference(deltanet_runs, "tp2")


def test_tp2_matches_tp1_loss_and_grads_hybrid_moe(hybrid_moe_runs):
    check_matches_reference(hybrid_moe_runs, "tp2")


def test_ep2_matches_ep1_loss_and_grads(hybrid_moe_runs):
    check_matches_reference(hybrid_moe_runs, "ep2")


def test_tp2_ep2_matches_one_process_loss_and_grads(hybrid_moe_tp2_ep2_runs):
    check_matches_reference(hybrid_moe_tp2_ep2_runs, "tp2_ep2")


def test_tp2_grouped_gemm_matches_tp1_per_expert_loss_and_grads(hybrid_moe_runs):
    check_matches_reference(hybrid_moe_runs, "tp2_grouped")


def test_ep2_grouped_gemm_matches_ep1_per_expert_loss_and_grads(hybrid_moe_runs):
    check_matches_reference(hybrid_moe_runs, "ep2_grouped")


def test_tp2_matches_tp1_loss_and_grads_rwkv7_value_residual(rwkv7_runs):
    check_matches_reference(rwkv7_runs, "tp2")
    v_lora = {name: grad for name, grad in rwkv7_runs["reference"]["grads"].items() if "v_lora" in name}
    assert v_lora and all(grad.abs().sum() > 0 for grad in v_lora.values()), sorted(v_lora)


def test_selective_recompute_keeps_the_value_residual_gradient(rwkv7_runs):
    """Recomputed mixers re-enter the forward's v_first slot: layer 0's value still gets its gradient."""
    check_matches_reference(rwkv7_runs, "tp2_selective_recompute")


def test_rwkv7_value_residual_is_refused_with_pipeline_parallel(rwkv7_runs):
    assert isinstance(rwkv7_runs["pp2"], str) and "needs pipeline_parallel=1" in rwkv7_runs["pp2"]


def test_rwkv7_megatron_model_equals_the_hf_model(rwkv7_runs):
    """The megatron model (v_first through its forward hooks) and the single-device Hugging Face model
    (v_first through its layer loop) give the same step-0 loss from the same weights."""
    import torch

    from linear_moe.components.convert.adapter import mcore_to_hf
    from linear_moe.model import preset
    from linear_moe.model.modeling import LinearMoEConfig, LinearMoEForCausalLM
    from megatron_dist_harness import _batch

    model_config = preset("tiny", **RWKV7_MODEL)
    model = LinearMoEForCausalLM(LinearMoEConfig.from_model_config(model_config)).eval()
    model.load_state_dict(mcore_to_hf(rwkv7_runs["reference"]["initial"]), strict=True)
    batch = _batch(model_config.vocab_size)
    tokens = torch.cat([batch["tokens"], batch["labels"][:, -1:]], dim=1)  # the HF model shifts its labels
    with torch.no_grad():
        loss = model(tokens, labels=tokens).lm_loss
    assert_rel_close("step-0 loss", rwkv7_runs["reference"]["losses"][0], loss, 1e-5)
