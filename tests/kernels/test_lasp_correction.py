"""The fused state correction (kernels/lasp/correction.py).

References: a run of the recurrence from the incoming state (the correction's meaning), autograd
through the PyTorch expression, and (slow, Triton interpreter) the PyTorch reference.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from linear_moe.kernels.lasp import naive_state_correction, state_correction
from linear_moe.kernels.testing import assert_rel_close
from linear_moe.kernels.triton_cpu import run_interpreted


def _decay_run(q, k, v, g, s0, scale):
    """Token loop: S_t = diag(exp g_t) S_{t-1} + k_t^T v_t, o_t = scale q_t S_t (g None: no decay)."""
    S, outs = s0.clone(), []
    for t in range(q.shape[1]):
        if g is not None:
            S = g[:, t].exp()[..., None] * S
        S = S + k[:, t, :, :, None] * v[:, t, :, None, :]
        outs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    return torch.stack(outs, 1)


@pytest.mark.parametrize("decay", ["none", "scalar", "diagonal"])
def test_zero_state_run_plus_correction_matches_run_from_state(decay):
    B, T, H, K, V = 2, 9, 2, 4, 5
    q, k, v = torch.randn(B, T, H, K), torch.randn(B, T, H, K), torch.randn(B, T, H, V)
    s_in = torch.randn(B, H, K, V)
    g = {"none": None, "scalar": F.logsigmoid(torch.randn(B, T, H, 1)).expand(B, T, H, K),
         "diagonal": F.logsigmoid(torch.randn(B, T, H, K))}[decay]
    scale = K ** -0.5
    o_local = _decay_run(q, k, v, g, torch.zeros(B, H, K, V), scale)
    gcum = None if g is None else g.cumsum(1)
    got = state_correction(o_local, q, gcum, s_in, scale, backend="torch")
    assert_rel_close("o", _decay_run(q, k, v, g, s_in, scale), got, 1e-5)


@pytest.mark.parametrize("with_decay", [False, True], ids=["no-decay", "decay"])
def test_correction_backward_matches_autograd(with_decay):
    B, T, H, K, V = 2, 7, 3, 4, 6
    leaves = [torch.randn(B, T, H, V), torch.randn(B, T, H, K),
              F.logsigmoid(torch.randn(B, T, H, K)).cumsum(1) if with_decay else None, torch.randn(B, H, K, V)]
    weight = torch.randn(B, T, H, V)
    grads = {}
    for name, fn in (("autograd", naive_state_correction), ("explicit", None)):
        xs = [None if x is None else x.clone().requires_grad_() for x in leaves]
        out = fn(*xs, 0.7) if fn else state_correction(*xs, 0.7, backend="torch")
        grads[name] = torch.autograd.grad((out * weight).sum(), [x for x in xs if x is not None])
    for r, g in zip(grads["autograd"], grads["explicit"]):
        assert_rel_close("grad", r, g, 1e-6)


def _check_triton_correction(device="cpu", shape=(2, 20, 2, 6, 10)):
    """Triton forward and backward vs PyTorch: T not a multiple of the block, K and V not powers of 2."""
    B, T, H, K, V = shape
    rnd = lambda *size: torch.randn(*size, device=device)  # noqa: E731
    weight = rnd(B, T, H, V)
    for with_decay in (False, True):
        base = [rnd(B, T, H, V), rnd(B, T, H, K), F.logsigmoid(rnd(B, T, H, K)).cumsum(1) if with_decay else None,
                rnd(B, H, K, V)]
        out = {}
        for backend in ("torch", "triton"):
            xs = [None if x is None else x.clone().requires_grad_() for x in base]
            o = state_correction(*xs, 0.5, backend=backend)
            out[backend] = [o, *torch.autograd.grad((o * weight).sum(), [x for x in xs if x is not None])]
        for i, (r, g) in enumerate(zip(out["torch"], out["triton"])):
            assert_rel_close(f"output/grad {i} (decay={with_decay})", r, g, 1e-5)
    # bf16 activations: the kernel upcasts; stated tolerance covers bf16 output rounding
    xs = [rnd(B, T, H, V).bfloat16(), rnd(B, T, H, K).bfloat16(), F.logsigmoid(rnd(B, T, H, K)).cumsum(1),
          rnd(B, H, K, V)]
    ref = naive_state_correction(*[x.float() for x in xs], 0.5)
    assert_rel_close("bf16 output", ref, state_correction(*xs, 0.5, backend="triton").float(), 1e-2)
    # a strided o, as the chunked cores return it ((B, H, T, V) memory viewed as (B, T, H, V))
    o_strided = rnd(B, H, T, V).transpose(1, 2)
    assert not o_strided.is_contiguous()
    args = (rnd(B, T, H, K), None, rnd(B, H, K, V))
    assert_rel_close("strided o", naive_state_correction(o_strided, *args, 0.5),
                     state_correction(o_strided, *args, 0.5, backend="triton"), 1e-5)


def _check_triton_correction_in_blocks_steps_and_t_splits():
    """K = 80, V = 72, T = 150, so every loop and grid axis has several steps, the last one masked.

    Default tiles, through autograd: 3 K steps of the forward; 2 K blocks and 3 T blocks of dq; 2 x 2
    (K, V) blocks and 3 T splits of dS. Small tiles, kernels called directly: 3 V blocks of the forward,
    3 V steps and 3 K blocks of dq, 3 x 3 blocks of dS in steps of 16 rows.
    """
    from linear_moe.kernels.lasp import correction

    B, T, H, K, V = 1, 150, 2, 80, 72
    c = correction.launch_constexprs(K, V, has_g=True)
    assert K / c["forward"]["BK"] > 2 and K / c["backward_dq"]["BK"] > 1 and T / c["backward_dq"]["BT"] > 2
    kv_blocks = math.ceil(K / c["backward_ds"]["BK"]) * math.ceil(V / c["backward_ds"]["BV"])
    assert kv_blocks == 4
    splits, rows = correction.t_splits(T, kv_blocks * B * H, torch.device("cpu"), c["backward_ds"]["BT"])
    assert splits == 3 and 2 * rows < T
    _check_triton_correction("cpu", (B, T, H, K, V))

    small = correction.CorrectionTiles(fwd_bt=16, fwd_bv=32, fwd_bk=32, dq_bt=16, dq_bk=32, dq_bv=32, ds_bt=16,
                                       ds_bk=32, ds_bv=32)
    q, o, d_out = torch.randn(B, T, H, K), torch.randn(B, T, H, V), torch.randn(B, T, H, V)
    gcum, s = F.logsigmoid(torch.randn(B, T, H, K)).cumsum(1), torch.randn(B, H, K, V)
    assert_rel_close("small tiles: output", naive_state_correction(o, q, gcum, s, 0.5),
                     correction._triton_forward(o, q, gcum, s, 0.5, small), 1e-5)
    for name, ref, got in zip(("d_q", "d_gcum", "d_s"), correction._torch_backward(d_out, q, gcum, s, 0.5),
                              correction._triton_backward(d_out, q, gcum, s, 0.5, small)):
        assert_rel_close(f"small tiles: {name}", ref, got, 1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("check", ["_check_triton_correction", "_check_triton_correction_in_blocks_steps_and_t_splits"])
def test_triton_correction_matches_torch(check):
    run_interpreted(__file__, check)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (compiled Triton)")
@pytest.mark.parametrize("shape", [(2, 20, 2, 6, 10), (1, 1000, 4, 128, 64)], ids=["T20-K6-V10", "T1000-K128-V64"])
def test_triton_correction_matches_torch_on_cuda(shape):
    _check_triton_correction("cuda", shape)
