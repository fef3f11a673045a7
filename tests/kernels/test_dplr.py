"""dplr: chunked form vs the naive recurrence, and the naive recurrence vs fla's reference."""
import pytest
import torch
import torch.nn.functional as F

from linear_moe.kernels.dplr import chunk_dplr, dplr, naive_dplr
from linear_moe.kernels.testing import assert_packed_grads_match_separate_runs, assert_rel_close

SHAPES = [  # B, T, H, K, V, chunk_size
    pytest.param(2, 37, 2, 8, 6, 16, id="B2-T37-H2-K8-V6-C16"),
    pytest.param(1, 70, 2, 16, 8, 64, id="B1-T70-H2-K16-V8-C64"),
    pytest.param(1, 30, 1, 8, 4, 24, id="B1-T30-H1-K8-V4-C24"),
]


def make_inputs(B, T, H, K, V, max_decay=1.0, requires_grad=False):
    """RWKV7-like inputs: a = -kk, b = kk * rate with kk unit-norm; gk in [-max_decay, 0)."""
    kk = F.normalize(torch.randn(B, T, H, K), dim=-1)
    rate = torch.rand(B, T, H, K)
    x = dict(q=torch.randn(B, T, H, K), k=torch.randn(B, T, H, K) * 0.5, v=torch.randn(B, T, H, V),
             a=-kk, b=kk * rate, gk=-max_decay * torch.rand(B, T, H, K).clamp_min(1e-3))
    return {n: t.requires_grad_(requires_grad) for n, t in x.items()}


def run_with_grads(fn, inputs, h0, **kw):
    o, final = fn(**inputs, initial_state=h0, output_final_state=True, **kw)
    gen = torch.Generator().manual_seed(1)
    loss = (o * torch.randn(o.shape, generator=gen)).sum() + (final * torch.randn(final.shape, generator=gen)).sum()
    leaves = {**inputs, "initial_state": h0}
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return o, final, dict(zip(leaves, grads))


@pytest.mark.parametrize("max_decay", [0.6065, 4.0], ids=["rwkv7-decay", "strong-decay"])
@pytest.mark.parametrize("B,T,H,K,V,C", SHAPES)
def test_chunk_matches_naive(B, T, H, K, V, C, max_decay):
    inputs = make_inputs(B, T, H, K, V, max_decay, requires_grad=True)
    h0 = torch.randn(B, H, K, V, requires_grad=True)
    o_ref, s_ref, g_ref = run_with_grads(naive_dplr, inputs, h0)
    o, s, grads = run_with_grads(chunk_dplr, inputs, h0, chunk_size=C)
    assert_rel_close("o", o_ref, o, 1e-4)
    assert_rel_close("final_state", s_ref, s, 1e-4)
    for name in g_ref:
        assert_rel_close(f"d{name}", g_ref[name], grads[name], 1e-4)


@pytest.mark.parametrize("backend", ["naive", "chunk"])
def test_varlen_matches_separate_runs(backend):
    lengths, H, K, V = [7, 21, 4], 2, 8, 4
    inputs = make_inputs(1, sum(lengths), H, K, V)
    h0 = torch.randn(len(lengths), H, K, V)
    cu = torch.tensor([0, 7, 28, 32])
    o, final = dplr(**inputs, initial_state=h0, output_final_state=True, cu_seqlens=cu, backend=backend,
                    chunk_size=16)
    for n, (start, end) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        part = {name: t[:, start:end] for name, t in inputs.items()}
        o_n, final_n = dplr(**part, initial_state=h0[n : n + 1], output_final_state=True, backend="naive")
        assert_rel_close(f"o[{n}]", o_n, o[:, start:end], 1e-5)
        assert_rel_close(f"final[{n}]", final_n, final[n : n + 1], 1e-5)


@pytest.mark.parametrize("backend", ["naive", "chunk"])
def test_varlen_gradients_match_separate_naive_runs(backend):
    lengths, H, K, V = [7, 21, 4], 2, 8, 4
    inputs = make_inputs(1, sum(lengths), H, K, V, requires_grad=True)
    h0 = torch.randn(len(lengths), H, K, V, requires_grad=True)
    assert_packed_grads_match_separate_runs(dplr, inputs, h0, torch.tensor([0, 7, 28, 32]), 1e-4,
                                            backend=backend, chunk_size=16)


def test_initial_state_continues_the_sequence():
    """Running [0, t) then [t, T) from the carried state equals one run over [0, T)."""
    inputs = make_inputs(2, 40, 2, 8, 8)
    o, final = dplr(**inputs, output_final_state=True, backend="chunk", chunk_size=16)
    o1, s1 = dplr(**{n: t[:, :19] for n, t in inputs.items()}, output_final_state=True, backend="chunk",
                  chunk_size=16)
    o2, s2 = dplr(**{n: t[:, 19:] for n, t in inputs.items()}, initial_state=s1, output_final_state=True,
                  backend="chunk", chunk_size=16)
    assert_rel_close("o", o, torch.cat([o1, o2], dim=1), 1e-5)
    assert_rel_close("final_state", final, s2, 1e-5)


def test_naive_matches_fla_naive_reference():
    from fla.ops.generalized_delta_rule.dplr.naive import dplr_recurrence

    B, T, H, K, V = 2, 13, 2, 8, 6
    x = make_inputs(B, T, H, K, V)
    h0 = torch.randn(B, H, K, V)
    head_first = [x[n].transpose(1, 2) for n in ("q", "k", "v", "a", "b", "gk")]
    o_ref, s_ref = dplr_recurrence(*head_first, initial_state=h0.clone(), output_final_state=True)
    o, s = naive_dplr(**x, initial_state=h0, output_final_state=True)
    assert_rel_close("o", o_ref.transpose(1, 2), o, 1e-5)
    assert_rel_close("final_state", s_ref, s, 1e-5)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(gk=torch.randn(1, 8, 2, 4)), "gk must match"),
        (dict(v=torch.randn(2, 8, 2, 4)), "v must be"),
        (dict(initial_state=torch.randn(1, 2, 8, 5)), "initial_state must be"),
        (dict(cu_seqlens=torch.tensor([0, 9])), "cu_seqlens must rise"),
    ],
    ids=["gk", "v", "initial_state", "cu_seqlens"],
)
def test_bad_inputs_raise_value_error(change, match):
    shape = (1, 8, 2, 8)
    args = dict(q=torch.randn(shape), k=torch.randn(shape), v=torch.randn(1, 8, 2, 4), a=torch.randn(shape),
                b=torch.randn(shape), gk=-torch.rand(shape))
    args.update(change)
    with pytest.raises(ValueError, match=match):
        dplr(**args)


def _check_fla_matches_naive():
    """Runs under the Triton interpreter (fresh process): fla's chunk_dplr_delta_rule behind backend="fla",
    forward and backward, fp32, T not a multiple of fla's chunk (64)."""
    B, T, H, K, V = 1, 20, 2, 16, 16
    inputs = make_inputs(B, T, H, K, V, max_decay=0.6065, requires_grad=True)
    h0 = torch.randn(B, H, K, V, requires_grad=True)
    o_ref, s_ref, g_ref = run_with_grads(naive_dplr, inputs, h0)
    o, s, grads = run_with_grads(dplr, inputs, h0, backend="fla")
    assert_rel_close("o", o_ref, o, 1e-4)
    assert_rel_close("final_state", s_ref, s, 1e-4)
    for name, reference in g_ref.items():
        assert_rel_close(f"d{name}", reference, grads[name], 1e-4)


@pytest.mark.slow
def test_fla_backend_matches_naive():
    from linear_moe.kernels.triton_cpu import run_interpreted

    run_interpreted(__file__, "_check_fla_matches_naive")
