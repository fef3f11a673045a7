"""delta_rule: chunked form vs the naive recurrence, and the naive recurrence vs fla's references."""
import pytest
import torch
import torch.nn.functional as F

from linear_moe.kernels.delta_rule import chunk_delta_rule, delta_rule, naive_delta_rule
from linear_moe.kernels.testing import assert_packed_grads_match_separate_runs, assert_rel_close

SHAPES = [  # B, T, H, K, V, chunk_size
    pytest.param(2, 37, 2, 8, 6, 16, id="B2-T37-H2-K8-V6-C16"),
    pytest.param(1, 64, 3, 16, 8, 32, id="B1-T64-H3-K16-V8-C32"),
    pytest.param(1, 20, 1, 8, 8, 64, id="B1-T20-H1-K8-V8-C64"),
]


def make_inputs(B, T, H, K, V, gated, requires_grad=False):
    x = dict(
        q=torch.randn(B, T, H, K),
        k=F.normalize(torch.randn(B, T, H, K), dim=-1),
        v=torch.randn(B, T, H, V),
        beta=torch.rand(B, T, H),
        g=F.logsigmoid(torch.randn(B, T, H) + 2) if gated else None,
    )
    return {n: (t.requires_grad_(requires_grad) if t is not None else None) for n, t in x.items()}


def run_with_grads(fn, inputs, h0, **kw):
    o, final = fn(**inputs, initial_state=h0, output_final_state=True, **kw)
    # a loss touching both outputs, with random weights so no gradient cancels by symmetry
    gen = torch.Generator().manual_seed(1)
    loss = (o * torch.randn(o.shape, generator=gen)).sum() + (final * torch.randn(final.shape, generator=gen)).sum()
    leaves = {n: t for n, t in inputs.items() if t is not None}
    leaves["initial_state"] = h0
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return o, final, dict(zip(leaves, grads))


@pytest.mark.parametrize("gated", [False, True], ids=["deltanet", "gated"])
@pytest.mark.parametrize("B,T,H,K,V,C", SHAPES)
def test_chunk_matches_naive(B, T, H, K, V, C, gated):
    inputs = make_inputs(B, T, H, K, V, gated, requires_grad=True)
    h0 = torch.randn(B, H, K, V, requires_grad=True)
    o_ref, s_ref, g_ref = run_with_grads(naive_delta_rule, inputs, h0)
    o, s, grads = run_with_grads(chunk_delta_rule, inputs, h0, chunk_size=C)
    assert_rel_close("o", o_ref, o, 1e-4)
    assert_rel_close("final_state", s_ref, s, 1e-4)
    for name in g_ref:
        assert_rel_close(f"d{name}", g_ref[name], grads[name], 1e-4)


@pytest.mark.parametrize("backend", ["naive", "chunk"])
def test_varlen_matches_separate_runs(backend):
    lengths, H, K, V = [5, 0, 19, 12], 2, 8, 4  # an empty sequence, as Mixture-of-Memories routing yields
    T = sum(lengths)
    inputs = make_inputs(1, T, H, K, V, gated=True)
    h0 = torch.randn(len(lengths), H, K, V)
    cu = torch.tensor([0, 5, 5, 24, 36])
    o, final = delta_rule(**inputs, initial_state=h0, output_final_state=True, cu_seqlens=cu,
                          backend=backend, chunk_size=8)
    for n, (start, end) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        part = {name: t[:, start:end] for name, t in inputs.items()}
        o_n, final_n = delta_rule(**part, initial_state=h0[n : n + 1], output_final_state=True,
                                  backend="naive")
        assert_rel_close(f"o[{n}]", o_n, o[:, start:end], 1e-5, allow_empty=start == end)
        assert_rel_close(f"final[{n}]", final_n, final[n : n + 1], 1e-5)


@pytest.mark.parametrize("backend", ["naive", "chunk"])
def test_varlen_gradients_match_separate_naive_runs(backend):
    lengths, H, K, V = [5, 0, 19, 12], 2, 8, 4
    inputs = make_inputs(1, sum(lengths), H, K, V, gated=True, requires_grad=True)
    h0 = torch.randn(len(lengths), H, K, V, requires_grad=True)
    assert_packed_grads_match_separate_runs(delta_rule, inputs, h0, torch.tensor([0, 5, 5, 24, 36]), 1e-4,
                                            backend=backend, chunk_size=8)


def test_initial_state_continues_the_sequence():
    """Running [0, t) then [t, T) from the carried state equals one run over [0, T)."""
    inputs = make_inputs(2, 40, 2, 8, 8, gated=True)
    o, final = delta_rule(**inputs, output_final_state=True, backend="chunk", chunk_size=16)
    first = {n: t[:, :23] for n, t in inputs.items()}
    second = {n: t[:, 23:] for n, t in inputs.items()}
    o1, s1 = delta_rule(**first, output_final_state=True, backend="chunk", chunk_size=16)
    o2, s2 = delta_rule(**second, initial_state=s1, output_final_state=True, backend="chunk", chunk_size=16)
    assert_rel_close("o", o, torch.cat([o1, o2], dim=1), 1e-5)
    assert_rel_close("final_state", final, s2, 1e-5)


def test_naive_matches_fla_naive_references():
    from fla.ops.delta_rule.naive import delta_rule_recurrence
    from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule

    B, T, H, K, V = 2, 13, 2, 8, 6
    x = make_inputs(B, T, H, K, V, gated=True)
    h0 = torch.randn(B, H, K, V)
    # plain delta rule: fla's reference is head-first (B, H, T, .)
    o_ref, s_ref = delta_rule_recurrence(*(t.transpose(1, 2) for t in (x["q"], x["k"], x["v"], x["beta"])),
                                         initial_state=h0.clone(), output_final_state=True)
    o, s = naive_delta_rule(x["q"], x["k"], x["v"], x["beta"], initial_state=h0, output_final_state=True)
    assert_rel_close("o (delta)", o_ref.transpose(1, 2), o, 1e-5)
    assert_rel_close("final (delta)", s_ref, s, 1e-5)
    o_ref, s_ref = naive_recurrent_gated_delta_rule(x["q"], x["k"], x["v"], x["beta"], x["g"],
                                                    initial_state=h0, output_final_state=True)
    o, s = naive_delta_rule(**x, initial_state=h0, output_final_state=True)
    assert_rel_close("o (gated)", o_ref, o, 1e-5)
    assert_rel_close("final (gated)", s_ref, s, 1e-5)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(k=torch.randn(1, 8, 2, 4)), "k must match"),
        (dict(v=torch.randn(1, 7, 2, 4)), "v must be"),
        (dict(beta=torch.rand(1, 8, 3)), "beta must be"),
        (dict(initial_state=torch.randn(2, 2, 8, 4)), "initial_state must be"),
        (dict(cu_seqlens=torch.tensor([0, 3, 7])), "cu_seqlens must rise"),
        (dict(backend="cuda"), "backend must be"),
    ],
    ids=["k", "v", "beta", "initial_state", "cu_seqlens", "backend"],
)
def test_bad_inputs_raise_value_error(change, match):
    args = dict(q=torch.randn(1, 8, 2, 8), k=torch.randn(1, 8, 2, 8), v=torch.randn(1, 8, 2, 4),
                beta=torch.rand(1, 8, 2))
    args.update(change)
    with pytest.raises(ValueError, match=match):
        delta_rule(**args)


def _check_fla_matches_naive():
    """Runs under the Triton interpreter (fresh process): fla's ops behind backend="fla"."""
    B, T, H, K, V = 1, 20, 2, 16, 16
    for gated in (False, True):
        x = make_inputs(B, T, H, K, V, gated)
        h0 = torch.randn(B, H, K, V)
        o_ref, s_ref = naive_delta_rule(**x, initial_state=h0, output_final_state=True)
        o, s = delta_rule(**x, initial_state=h0, output_final_state=True, backend="fla")
        assert_rel_close(f"o (gated={gated})", o_ref, o, 1e-3)
        assert_rel_close(f"final (gated={gated})", s_ref, s, 1e-3)


@pytest.mark.slow
def test_fla_backend_matches_naive():
    from linear_moe.kernels.triton_cpu import run_interpreted

    run_interpreted(__file__, "_check_fla_matches_naive")
