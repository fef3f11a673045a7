"""The chunked GLA path against the token-by-token oracle, and the oracle against fla's references."""
from __future__ import annotations

import pytest
import torch

from linear_moe.kernels.gla import chunk_gla, gla, naive_gla
from linear_moe.kernels.testing import assert_rel_close

RATIO = 1e-4  # fp32 relative error (RMS diff / RMS reference)


def make_inputs(B, T, H, K, V, decay, bonus, init, g_min=-1.0, seed=0):
    """Random leaves (requires_grad) for one call; decay in {"none", "scalar", "diagonal"}."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    x = {"q": rand(B, T, H, K), "k": rand(B, T, H, K), "v": rand(B, T, H, V)}
    g_shape = {"none": None, "scalar": (B, T, H), "diagonal": (B, T, H, K)}[decay]
    x["g"] = None if g_shape is None else g_min * torch.rand(*g_shape, generator=gen)
    x["u"] = rand(H, K) if bonus else None
    N = B
    x["initial_state"] = rand(N, H, K, V) if init else None
    return {name: (t.requires_grad_() if t is not None else None) for name, t in x.items()}


def run_with_grads(fn, inputs, **kwargs):
    """Forward, then gradients of a fixed random projection of (o, final state) w.r.t. every leaf."""
    o, state = fn(inputs["q"], inputs["k"], inputs["v"], inputs["g"], u=inputs["u"],
                  initial_state=inputs["initial_state"], output_final_state=True, **kwargs)
    gen = torch.Generator().manual_seed(123)
    loss = (o * torch.randn(o.shape, generator=gen)).sum() + (state * torch.randn(state.shape, generator=gen)).sum()
    leaves = {name: t for name, t in inputs.items() if t is not None}
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return o, state, dict(zip(leaves, grads))


def assert_same_run(reference, actual, ratio=RATIO):
    (o_ref, s_ref, g_ref), (o, s, g) = reference, actual
    assert_rel_close("o", o_ref, o, ratio)
    assert_rel_close("final_state", s_ref, s, ratio)
    for name in g_ref:
        assert_rel_close(f"d{name}", g_ref[name], g[name], ratio)


SHAPES = [
    pytest.param((2, 130, 3, 16, 24), 64, id="B2-T130-H3-K16-V24-C64"),
    pytest.param((1, 45, 2, 8, 8), 16, id="B1-T45-H2-K8-V8-C16"),
    pytest.param((1, 48, 2, 8, 4), 24, id="B1-T48-H2-K8-V4-C24"),
    pytest.param((1, 23, 2, 4, 4), 7, id="B1-T23-H2-K4-V4-C7"),
    pytest.param((1, 5, 1, 4, 4), 1, id="B1-T5-H1-K4-V4-C1"),
]


@pytest.mark.parametrize("bonus", [False, True], ids=["no_u", "u"])
@pytest.mark.parametrize("decay", ["none", "scalar", "diagonal"])
@pytest.mark.parametrize("shape,chunk_size", SHAPES)
def test_chunk_matches_naive(shape, chunk_size, decay, bonus):
    inputs = make_inputs(*shape, decay=decay, bonus=bonus, init=True)
    reference = run_with_grads(naive_gla, inputs)
    assert_same_run(reference, run_with_grads(chunk_gla, inputs, chunk_size=chunk_size))


@pytest.mark.parametrize("decay", ["scalar", "diagonal"])
def test_chunk_matches_naive_without_initial_state(decay):
    inputs = make_inputs(2, 70, 2, 8, 8, decay=decay, bonus=False, init=False)
    o_ref, _ = naive_gla(inputs["q"], inputs["k"], inputs["v"], inputs["g"], scale=0.3)
    o, state = chunk_gla(inputs["q"], inputs["k"], inputs["v"], inputs["g"], scale=0.3, chunk_size=32)
    assert state is None
    assert_rel_close("o", o_ref, o, RATIO)


@pytest.mark.parametrize("bonus", [False, True], ids=["no_u", "u"])
@pytest.mark.parametrize("decay", ["scalar", "diagonal"])
def test_chunk_strong_decay_matches_naive(decay, bonus):
    """g down to -20 per step: a naive exp(-cumsum) factorisation would overflow fp32 at C = 64."""
    inputs = make_inputs(1, 200, 2, 16, 16, decay=decay, bonus=bonus, init=True, g_min=-20.0)
    with torch.no_grad():  # every fifth step decays by exactly -5, the brief's reference strength
        inputs["g"][:, ::5] = -5.0
    reference = run_with_grads(naive_gla, inputs)
    actual = run_with_grads(chunk_gla, inputs, chunk_size=64)
    assert_same_run(reference, actual)


@pytest.mark.parametrize("bonus", [False, True], ids=["no_u", "u"])
def test_chunk_mixed_decay_matches_naive(bonus):
    """Mild decays with isolated total forgetting (g = -120, past fp32's exp range, in some channels):
    sub-chunks holding such a step take the banded path, the others the factored one, in one call."""
    inputs = make_inputs(2, 150, 2, 16, 16, decay="diagonal", bonus=bonus, init=True, g_min=-0.2)
    with torch.no_grad():
        inputs["g"][0, 37, :, 3] = -120.0
        inputs["g"][1, 100, 1, :] = -120.0
    reference = run_with_grads(naive_gla, inputs)
    assert_same_run(reference, run_with_grads(chunk_gla, inputs, chunk_size=64))


@pytest.mark.parametrize("bonus", [False, True], ids=["no_u", "u"])
@pytest.mark.parametrize("decay", ["none", "scalar", "diagonal"])
def test_chunk_varlen_matches_separate_runs(decay, bonus):
    lengths = [37, 1, 0, 70, 16]
    H, K, V = 2, 8, 8
    T, N = sum(lengths), len(lengths)
    packed = make_inputs(1, T, H, K, V, decay=decay, bonus=bonus, init=False)
    packed["initial_state"] = torch.randn(N, H, K, V).requires_grad_()
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.long)
    o, state, grads = run_with_grads(chunk_gla, packed, cu_seqlens=cu_seqlens, chunk_size=16)

    # reference: the naive recurrence on each sequence on its own (B = 1, no cu_seqlens), same loss projection
    leaves = {n: t for n, t in packed.items() if t is not None}
    o_parts, state_parts = [], []
    for n, (start, end) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())):
        o_n, s_n = naive_gla(packed["q"][:, start:end], packed["k"][:, start:end], packed["v"][:, start:end],
                             None if packed["g"] is None else packed["g"][:, start:end], u=packed["u"],
                             initial_state=packed["initial_state"][n : n + 1], output_final_state=True)
        o_parts.append(o_n)
        state_parts.append(s_n)
    o_ref, state_ref = torch.cat(o_parts, dim=1), torch.cat(state_parts, dim=0)
    gen = torch.Generator().manual_seed(123)
    loss = (o_ref * torch.randn(o_ref.shape, generator=gen)).sum() + (
        state_ref * torch.randn(state_ref.shape, generator=gen)).sum()
    grads_ref = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))
    assert_same_run((o_ref, state_ref, grads_ref), (o, state, grads))
    # a zero-length sequence hands its initial state through unchanged
    assert_rel_close("empty sequence state", packed["initial_state"][2], state[2], RATIO)


def test_gla_backends_match_naive():
    inputs = make_inputs(2, 33, 2, 8, 8, decay="diagonal", bonus=True, init=True)
    args = (inputs["q"], inputs["k"], inputs["v"], inputs["g"])
    kwargs = dict(u=inputs["u"], initial_state=inputs["initial_state"], output_final_state=True)
    o_ref, s_ref = naive_gla(*args, **kwargs)
    for backend in ("auto", "chunk", "naive"):
        o, s = gla(*args, backend=backend, chunk_size=16, **kwargs)
        assert_rel_close(f"o[{backend}]", o_ref, o, RATIO)
        assert_rel_close(f"state[{backend}]", s_ref, s, RATIO)


def test_gla_keeps_v_dtype_and_fp32_state():
    inputs = make_inputs(1, 20, 2, 8, 8, decay="scalar", bonus=False, init=False)
    q, k, v, g = (inputs[n].detach().bfloat16() for n in ("q", "k", "v", "g"))
    o_ref, s_ref = naive_gla(q, k, v, g, output_final_state=True)
    o, s = gla(q, k, v, g, output_final_state=True, backend="chunk", chunk_size=8)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    assert_rel_close("o", o_ref.float(), o.float(), 1e-2)
    assert_rel_close("state", s_ref, s, 1e-4)


# --- the oracle against fla's own pure-PyTorch references ---------------------------------------


def test_naive_matches_fla_naive_recurrent_gla():
    from fla.ops.gla.naive import naive_recurrent_gla

    x = make_inputs(2, 40, 3, 8, 12, decay="diagonal", bonus=False, init=True)
    o_ref, s_ref = naive_recurrent_gla(x["q"], x["k"], x["v"], x["g"], initial_state=x["initial_state"],
                                       output_final_state=True)
    o, s = naive_gla(x["q"], x["k"], x["v"], x["g"], initial_state=x["initial_state"], output_final_state=True)
    assert_rel_close("o", o_ref, o, RATIO)
    assert_rel_close("final_state", s_ref, s, RATIO)


@pytest.mark.parametrize("decay", ["none", "scalar"])
def test_naive_matches_fla_naive_recurrent_simple_gla(decay):
    from fla.ops.simple_gla.naive import naive_recurrent_simple_gla

    x = make_inputs(2, 40, 3, 8, 12, decay=decay, bonus=False, init=True)
    g = x["g"] if x["g"] is not None else torch.zeros(2, 40, 3)
    o_ref, s_ref = naive_recurrent_simple_gla(x["q"], x["k"], x["v"], g, scale=0.5,
                                              initial_state=x["initial_state"], output_final_state=True)
    o, s = naive_gla(x["q"], x["k"], x["v"], x["g"], scale=0.5, initial_state=x["initial_state"],
                     output_final_state=True)
    assert_rel_close("o", o_ref, o, RATIO)
    assert_rel_close("final_state", s_ref, s, RATIO)


def test_naive_matches_fla_naive_recurrent_rwkv6():
    from fla.ops.rwkv6.recurrent_naive import naive_recurrent_rwkv6

    x = make_inputs(2, 40, 3, 8, 12, decay="diagonal", bonus=True, init=True)
    to_bhtk = lambda t: t.transpose(1, 2)  # noqa: E731  fla's rwkv6 reference is head-first
    o_ref, s_ref = naive_recurrent_rwkv6(*map(to_bhtk, (x["q"], x["k"], x["v"], x["g"])), x["u"], scale=0.7,
                                         initial_state=x["initial_state"], output_final_state=True)
    o, s = naive_gla(x["q"], x["k"], x["v"], x["g"], u=x["u"], scale=0.7, initial_state=x["initial_state"],
                     output_final_state=True)
    assert_rel_close("o", to_bhtk(o_ref), o, RATIO)
    assert_rel_close("final_state", s_ref, s, RATIO)


# --- input checks ------------------------------------------------------------------------------

B, T, H, K, V = 2, 10, 3, 4, 5
_q = torch.zeros(B, T, H, K)
BAD_INPUTS = {
    "q-3d": dict(q=torch.zeros(B, T, H)),
    "k-shape": dict(k=torch.zeros(B, T, H, K + 1)),
    "v-heads": dict(v=torch.zeros(B, T, H + 1, V)),
    "g-rank": dict(g=torch.zeros(B, T)),
    "g-diag-K": dict(g=torch.zeros(B, T, H, K + 1)),
    "g-scalar-H": dict(g=torch.zeros(B, T, H + 1)),
    "u-shape": dict(u=torch.zeros(H, K, 1)),
    "state-shape": dict(initial_state=torch.zeros(B, H, K, V + 1)),
    "varlen-B2": dict(cu_seqlens=torch.tensor([0, T])),
    "varlen-end": dict(q=torch.zeros(1, T, H, K), k=torch.zeros(1, T, H, K), v=torch.zeros(1, T, H, V),
                       cu_seqlens=torch.tensor([0, 4, T - 1])),
    "varlen-state-N": dict(q=torch.zeros(1, T, H, K), k=torch.zeros(1, T, H, K), v=torch.zeros(1, T, H, V),
                           cu_seqlens=torch.tensor([0, 4, T]), initial_state=torch.zeros(1, H, K, V)),
}


@pytest.mark.parametrize("backend", ["chunk", "naive", "fla"])
@pytest.mark.parametrize("bad", list(BAD_INPUTS.values()), ids=list(BAD_INPUTS))
def test_bad_shapes_raise_value_error(bad, backend):
    args = dict(q=_q, k=_q, v=torch.zeros(B, T, H, V), g=None) | bad
    with pytest.raises(ValueError, match="gla"):
        gla(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("g"), backend=backend, **args)


def test_unknown_backend_raises_value_error():
    with pytest.raises(ValueError, match="backend"):
        gla(_q, _q, torch.zeros(B, T, H, V), backend="cuda")


# --- segmenting long sequences, and fla's Triton ops through the dispatch --------------------------


@pytest.mark.parametrize("decay", ["scalar", "diagonal"])
def test_chunk_segments_match_naive(decay, monkeypatch):
    """Sequences longer than SEGMENT_TOKENS run segment by segment with the state handed on."""
    import linear_moe.kernels.gla.chunk as chunk_module

    monkeypatch.setattr(chunk_module, "SEGMENT_TOKENS", 32)
    inputs = make_inputs(1, 100, 2, 8, 8, decay=decay, bonus=True, init=True)
    assert_same_run(run_with_grads(naive_gla, inputs), run_with_grads(chunk_gla, inputs, chunk_size=16))


def _check_fla_backend_matches_naive():
    """Runs under the Triton interpreter (fresh process): gla(backend="fla") against the oracle."""
    cases = [("none", False), ("scalar", False), ("diagonal", False), ("diagonal", True)]
    for decay, bonus in cases:
        x = make_inputs(1, 40, 2, 16, 16, decay=decay, bonus=bonus, init=True, g_min=-0.5)
        reference = run_with_grads(naive_gla, x)
        actual = run_with_grads(lambda *a, **kw: gla(*a, backend="fla", **kw), x)
        try:
            assert_same_run(reference, actual, ratio=1e-3)
        except AssertionError as err:
            raise AssertionError(f"decay={decay} u={bonus}: {err}") from err


@pytest.mark.slow
def test_fla_backend_matches_naive():
    from linear_moe.kernels.triton_cpu import run_interpreted

    run_interpreted(__file__, "_check_fla_backend_matches_naive")
