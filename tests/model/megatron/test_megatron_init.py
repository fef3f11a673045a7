"""Layout-independent init: the gathered initial model of TP=2, PP=2 and EP=2 equals the single-process build,
with per-expert (SequentialMLP) and grouped-GEMM (GroupedMLP) experts alike.

One spawned 2-rank gloo world builds every (model, layout) pair once; the tests read its results.
"""
import math
import traceback

import pytest
import torch

from dist_support import spawn_world
from megatron_dist_harness import GROUPED_GEMM_CONFIG

pytestmark = [pytest.mark.distributed, pytest.mark.xdist_group("dist")]

#: name -> (preset, overrides): a hybrid with softmax attention, and gated DeltaNet with shared experts
MODELS = {
    "hybrid-LLLA": ("tiny-hybrid", dict()),
    "gated_deltanet-LL": ("tiny", dict(lsm_mixer="gated_deltanet", layer_pattern="LL", num_shared_experts=1,
                                       shared_expert_gate=True, moe_router="sigmoid_bias", moe_aux_loss_coeff=0.0)),
}
#: name -> (ParallelSizes kwargs, transformer_config kwargs); the reference is the per-expert single-process build
LAYOUTS = {"tp2": (dict(tensor=2), {}), "pp2": (dict(pipeline=2), {}), "ep2": (dict(expert=2), {}),
           "grouped": ({}, GROUPED_GEMM_CONFIG), "tp2_grouped": (dict(tensor=2), GROUPED_GEMM_CONFIG),
           "ep2_grouped": (dict(expert=2), GROUPED_GEMM_CONFIG)}
SEED = 1234


def _initial_state(model_config, sizes, seed=SEED, extra_module=False, config_kwargs=None):
    """Build under ``sizes``; return the gathered full initial state dict (or the error for ``extra_module``)."""
    from megatron.core import parallel_state as ps

    from linear_moe.model.megatron.config import transformer_config
    from linear_moe.model.megatron.gpt import build_gpt_model
    from linear_moe.model.megatron.init import initialize_parameters
    from linear_moe.model.megatron.parallel import initialize_parallel
    from linear_moe.model.megatron.state_dict import RankCoords, gather_full_state_dict, shard_layout

    initialize_parallel(sizes, seed=0)
    try:
        config = transformer_config(model_config, sizes, **(config_kwargs or {}))
        torch.manual_seed(0)
        model = build_gpt_model(model_config, config, seed=seed)
        if extra_module:
            model.extra = torch.nn.Module()
            model.extra.scale = torch.nn.Parameter(torch.ones(3))
            try:
                initialize_parameters(model, model_config, config, seed)
            except ValueError as error:
                return str(error)
            return "no error"
        layout = shard_layout(model)
        coords = RankCoords.current(model_config.num_layers, model_config.num_experts)
        local = {k: v.detach().clone() for k, v in model.state_dict().items() if k in layout}
        return gather_full_state_dict(local, layout, coords)
    finally:
        ps.destroy_model_parallel()


def _worker(rank, scratch_dir):
    import linear_moe.model.mixers  # noqa: F401  (fills the mixer registry)
    from linear_moe.model import preset
    from linear_moe.model.megatron.parallel import ParallelSizes

    results = {}
    for model_name, (preset_name, overrides) in MODELS.items():
        model_config = preset(preset_name, **overrides)
        runs = {"reference": _initial_state(model_config, ParallelSizes())}
        for layout_name, (sizes, config_kwargs) in LAYOUTS.items():
            try:
                runs[layout_name] = _initial_state(model_config, ParallelSizes(**sizes), config_kwargs=config_kwargs)
            except Exception:  # reported by the test that owns this layout
                runs[layout_name] = traceback.format_exc()
        results[model_name] = runs
    model_config = _config("gated_deltanet-LL")
    results["other_seed"] = _initial_state(model_config, ParallelSizes(), seed=SEED + 1)
    results["unknown_module_error"] = _initial_state(model_config, ParallelSizes(), extra_module=True)
    return results


@pytest.fixture(scope="module")
def results():
    return spawn_world(_worker, nprocs=2)


def _config(model_name):
    from linear_moe.model import preset

    preset_name, overrides = MODELS[model_name]
    return preset(preset_name, **overrides)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_layout_initial_state_matches_single_process(results, model_name, layout):
    reference, run = results[model_name]["reference"], results[model_name][layout]
    assert not isinstance(run, str), run
    assert set(run) == set(reference)
    different = [name for name in reference if not torch.equal(run[name], reference[name])]
    assert not different, f"{layout} initial tensors differ from the single-process build: {different}"


@pytest.mark.parametrize("layout", ["ep2", "ep2_grouped"])
@pytest.mark.parametrize("model_name", list(MODELS))
def test_ep2_global_experts_are_pairwise_different(results, model_name, layout):
    run = results[model_name][layout]
    assert not isinstance(run, str), run
    mc = _config(model_name)
    for layer in range(mc.num_layers):
        for weight in ("linear_fc1.weight", "linear_fc2.weight"):
            experts = [run[f"decoder.layers.{layer}.mlp.experts.local_experts.{e}.{weight}"]
                       for e in range(mc.num_experts)]
            for i in range(mc.num_experts):
                for j in range(i + 1, mc.num_experts):
                    assert not torch.equal(experts[i], experts[j]), (layer, weight, i, j)


def test_layers_and_seeds_draw_different_values(results):
    reference = results["gated_deltanet-LL"]["reference"]
    other_seed = results["other_seed"]
    for suffix in ("self_attention.mixer.q_proj.proj.weight", "self_attention.mixer.A_log", "mlp.router.weight",
                   "mlp.experts.local_experts.0.linear_fc1.weight"):
        assert not torch.equal(reference[f"decoder.layers.0.{suffix}"], reference[f"decoder.layers.1.{suffix}"])
        assert not torch.equal(reference[f"decoder.layers.0.{suffix}"], other_seed[f"decoder.layers.0.{suffix}"])


@pytest.mark.parametrize("model_name", list(MODELS))
def test_init_follows_megatron_conventions(results, model_name):
    """Norms one, biases zero, linears normal(0, std), output projections std / sqrt(2 * num_layers)."""
    state, mc = results[model_name]["reference"], _config(model_name)
    std, out_std = mc.initializer_range, mc.initializer_range / math.sqrt(2 * mc.num_layers)
    pools = {std: [], out_std: []}
    for name, tensor in state.items():
        if name.endswith("layernorm.weight"):
            assert torch.equal(tensor, torch.ones_like(tensor)), name
        elif name.endswith("expert_bias"):
            assert torch.equal(tensor, torch.zeros_like(tensor)), name
        elif name.endswith(("linear_fc2.weight", "mixer.o_proj.weight")):
            pools[out_std].append(tensor.flatten())
        elif name.endswith(("linear_fc1.weight", "router.weight", "q_proj.weight", "q_proj.proj.weight",
                            "word_embeddings.weight", "output_layer.weight")):
            pools[std].append(tensor.flatten())
    for expected, tensors in pools.items():
        values = torch.cat(tensors)
        assert abs(values.mean().item()) < 0.05 * expected
        assert abs(values.std().item() / expected - 1) < 0.05, (expected, values.std().item())


def test_gated_deltanet_keeps_its_own_decay_init(results):
    """A_log ~ log U(0, 16) and softplus(dt_bias) in [1e-4, 0.1] per head, not a normal linear init."""
    state, mc = results["gated_deltanet-LL"]["reference"], _config("gated_deltanet-LL")
    for layer in range(mc.num_layers):
        A = state[f"decoder.layers.{layer}.self_attention.mixer.A_log"].exp()
        dt = torch.nn.functional.softplus(state[f"decoder.layers.{layer}.self_attention.mixer.dt_bias"])
        assert A.shape == dt.shape == (mc.num_heads,)
        assert bool((A >= 1e-4 - 1e-7).all() and (A <= 16 + 1e-5).all()), A
        assert bool((dt >= 1e-4 - 1e-7).all() and (dt <= 0.1 + 1e-6).all()), dt
        assert A.std() > 0.1  # drawn per head, not a constant


def test_module_without_rule_raises(results):
    message = results["unknown_module_error"]
    assert "extra (Module) owns tensors ['scale'] but has no init rule" in message, message
