"""TP / EP / PP / DP layouts of the megatron model against the one-process reference, over 3 AdamW steps.

Tolerances (fp32, relative RMS error): losses 1e-5, step-1 gradients and final parameters 1e-4; the
layouts differ from the reference only in the order of floating-point sums.
"""
import pytest

from linear_moe.kernels.testing import assert_rel_close
from megatron_dist_harness import run_case

pytestmark = [pytest.mark.distributed, pytest.mark.xdist_group("dist")]

LOSS_RATIO = 1e-5
GRAD_RATIO = 1e-4

GLA = dict(layer_pattern="lL", num_layers=2, lsm_mixer="gla")
DELTANET = dict(layer_pattern="ll", num_layers=2, lsm_mixer="deltanet")
HYBRID_MOE = dict(layer_pattern="LA", num_layers=2, lsm_mixer="gla")


def check_matches_reference(result):
    reference, layout = result["reference"], result["layout"]
    assert set(layout["initial"]) == set(reference["initial"]), "sharding lost or renamed tensors"
    for name, tensor in reference["initial"].items():
        assert_rel_close(f"initial {name}", tensor, layout["initial"][name], 0.0)
    assert_rel_close("losses", reference["losses"], layout["losses"], LOSS_RATIO)
    assert set(layout["grads"]) == set(reference["grads"])
    for name, grad in reference["grads"].items():
        assert_rel_close(f"grad {name}", grad, layout["grads"][name], GRAD_RATIO)
    for name, param in reference["params"].items():
        assert_rel_close(f"param {name}", param, layout["params"][name], GRAD_RATIO)


def test_tp2_matches_tp1_loss_and_grads_gla():
    check_matches_reference(run_case(dict(model=GLA, sizes=dict(tensor=2))))
