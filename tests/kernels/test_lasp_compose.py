"""Prefix/suffix composition of chunk state maps (kernels/lasp/compose.py).

References: the token-by-token recurrence's states at chunk boundaries, autograd through the loop
reference, and (slow, Triton interpreter) the PyTorch reference.
"""
import pytest
import torch

from linear_moe.kernels.lasp import naive_prefix_compose, prefix_compose
from linear_moe.kernels.testing import assert_rel_close
from linear_moe.kernels.triton_cpu import run_interpreted


def _delta_step(S, k_t, v_t, beta_t, g_t):
    """One gated-delta-rule step on (N, H, K, V): exp(g)(I - beta k k^T) S + beta k v^T."""
    kS = torch.einsum("nhk,nhkv->nhv", k_t, S)
    S = S - beta_t[..., None, None] * k_t[..., :, None] * kS[..., None, :]
    return g_t.exp()[..., None, None] * S + beta_t[..., None, None] * k_t[..., :, None] * v_t[..., None, :]


def _decay_step(S, k_t, v_t, g_t):
    return g_t.exp()[..., None] * S + k_t[..., :, None] * v_t[..., None, :]


@pytest.mark.parametrize("family", ["diagonal_decay", "gated_delta_rule"])
def test_prefix_compose_matches_recurrence_at_chunk_boundaries(family):
    N, T, H, K, V, W = 2, 12, 2, 4, 3, 3
    k = torch.nn.functional.normalize(torch.randn(N, T, H, K), dim=-1)
    v = torch.randn(N, T, H, V)
    s0 = torch.randn(N, H, K, V)
    if family == "diagonal_decay":
        g = torch.nn.functional.logsigmoid(torch.randn(N, T, H, K) + 1)
        step = lambda S, t: _decay_step(S, k[:, t], v[:, t], g[:, t])  # noqa: E731
    else:
        g = torch.nn.functional.logsigmoid(torch.randn(N, T, H) + 1)
        beta = torch.rand(N, T, H)
        step = lambda S, t: _delta_step(S, k[:, t], v[:, t], beta[:, t], g[:, t])  # noqa: E731
    L = T // W
    truth, S = [s0], s0
    for t in range(T):
        S = step(S, t)
        if (t + 1) % L == 0:
            truth.append(S)
    a_list, b_list = [], []
    for r in range(W):
        b = torch.zeros(N, H, K, V)
        for t in range(r * L, (r + 1) * L):
            b = step(b, t)
        b_list.append(b)
        if family == "diagonal_decay":
            a_list.append(g[:, r * L:(r + 1) * L].sum(1).exp())
        else:  # a_r = the recurrence without inputs applied to the identity (V = K columns)
            A = torch.eye(K).expand(N, H, K, K).clone()
            for t in range(r * L, (r + 1) * L):
                A = _delta_step(A, k[:, t], torch.zeros(N, H, K), beta[:, t], g[:, t])
            a_list.append(A)
    states = prefix_compose(torch.stack(a_list), torch.stack(b_list), s0, backend="torch")
    assert_rel_close("states at chunk boundaries", torch.stack(truth), states, 1e-5)


@pytest.mark.parametrize("matrix", [False, True], ids=["diagonal", "matrix"])
def test_suffix_compose_matches_autograd(matrix):
    W, N, H, K, V = 4, 2, 3, 5, 6
    a = (torch.randn(W, N, H, K, K) / K if matrix else torch.rand(W, N, H, K)).requires_grad_()
    b = torch.randn(W, N, H, K, V, requires_grad=True)
    s0 = torch.randn(N, H, K, V, requires_grad=True)
    weight = torch.randn(W + 1, N, H, K, V)
    ref = torch.autograd.grad((naive_prefix_compose(a, b, s0) * weight).sum(), (a, b, s0))
    got = torch.autograd.grad((prefix_compose(a, b, s0, backend="torch") * weight).sum(), (a, b, s0))
    for name, r, g in zip(("d_a", "d_b", "d_s0"), ref, got):
        assert_rel_close(name, r, g, 1e-6)


def test_triton_backend_without_interpreter_is_refused():
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the triton backend is legitimate")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        prefix_compose(torch.rand(2, 1, 1, 4), torch.randn(2, 1, 1, 4, 4), torch.zeros(1, 1, 4, 4), backend="triton")


def _check_triton_compose(device="cpu", shape=(3, 2, 2, 6, 10)):
    """Triton forward and backward vs the PyTorch reference, diagonal and matrix, non-power-of-2 K, V."""
    W, N, H, K, V = shape
    for matrix in (False, True):
        a = torch.randn(W, N, H, K, K, device=device) / K if matrix else torch.rand(W, N, H, K, device=device)
        b, s0 = torch.randn(W, N, H, K, V, device=device), torch.randn(N, H, K, V, device=device)
        weight = torch.randn(W + 1, N, H, K, V, device=device)
        out = {}
        for backend in ("torch", "triton"):
            leaves = [t.clone().requires_grad_() for t in (a, b, s0)]
            states = prefix_compose(*leaves, backend=backend)
            out[backend] = [states, *torch.autograd.grad((states * weight).sum(), leaves)]
        for name, r, g in zip(("states", "d_a", "d_b", "d_s0"), out["torch"], out["triton"]):
            assert_rel_close(f"{name} (matrix={matrix})", r, g, 1e-5)


@pytest.mark.slow
def test_triton_compose_matches_torch():
    run_interpreted(__file__, "_check_triton_compose")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (compiled Triton)")
@pytest.mark.parametrize("shape", [(3, 2, 2, 6, 10), (8, 1, 4, 64, 128)], ids=["W3-K6-V10", "W8-K64-V128"])
def test_triton_compose_matches_torch_on_cuda(shape):
    _check_triton_compose("cuda", shape)
