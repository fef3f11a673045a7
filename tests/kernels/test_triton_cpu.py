"""The Triton-interpreter patches: each one is needed (left out: wrong, NaN or error) and each works.

The ``_check_*`` functions run in a fresh interpreter-mode process (``run_interpreted``), because
``triton.jit`` decides interpreter vs compiler when a kernel is decorated.  References are torch.
"""
import pytest
import triton
import triton.language as tl
from triton.language.extra import libdevice

from linear_moe.kernels.triton_cpu import PATCHES, bf16_bits_to_f32, f32_to_bf16_bits, run_interpreted

N = 16


@triton.autotune(configs=[triton.Config({"SCALE": 2.0}), triton.Config({"SCALE": 3.0})], key=["n"])
@triton.jit
def scale_kernel(x, y, n, N: tl.constexpr, SCALE: tl.constexpr):
    r = tl.arange(0, N)
    tl.store(y + r, tl.load(x + r, mask=r < n) * SCALE, mask=r < n)


@triton.jit
def dot_kernel(a, b, c, N: tl.constexpr):
    r = tl.arange(0, N)
    idx = r[:, None] * N + r[None, :]
    tl.store(c + idx, tl.dot(tl.load(a + idx), tl.load(b + idx)))


@triton.jit
def bf16_elementwise_kernel(a, b, c, N: tl.constexpr):
    r = tl.arange(0, N)
    x, y = tl.load(a + r), tl.load(b + r)
    tl.store(c + r, x * y + x - y / 4)


@triton.jit
def libdevice_kernel(x, y, N: tl.constexpr):
    r = tl.arange(0, N)
    v = tl.load(x + r)
    tl.store(y + r, libdevice.tanh(v) + libdevice.log1p(libdevice.exp(v)))


@triton.jit
def range_kernel(y, n, N: tl.constexpr):
    acc = tl.zeros([N], dtype=tl.float32)
    for i in range(0, n):
        acc += i.to(tl.float32) * tl.arange(0, N).to(tl.float32)
    tl.store(y + tl.arange(0, N), acc)


@triton.jit
def gather_kernel(x, index, y, N: tl.constexpr):
    r = tl.arange(0, N)
    tl.store(y + r, fla_op.gather(tl.load(x + r), tl.load(index + r), 0))  # fla's alias of tl.gather


def _check_autotune():
    import torch

    from linear_moe.kernels.testing import assert_rel_close

    x = torch.randn(N)
    y = torch.empty(N)
    scale_kernel[(1,)](x, y, N, N=N)
    assert_rel_close("autotune keeps the first config (SCALE=2)", x * 2.0, y, 1e-6)


def _check_bf16():
    import torch

    from linear_moe.kernels.testing import assert_rel_close

    a, b = torch.randn(N, N).bfloat16(), torch.randn(N, N).bfloat16()
    c = torch.empty(N, N)
    dot_kernel[(1,)](a, b, c, N=N)
    assert_rel_close("bf16 tl.dot", a.float() @ b.float(), c, 1e-5)
    x, y = torch.randn(N).bfloat16(), torch.randn(N).bfloat16()
    z = torch.empty(N, dtype=torch.bfloat16)
    bf16_elementwise_kernel[(1,)](x, y, z, N=N)
    assert_rel_close("bf16 elementwise", (x * y + x - y / 4).float(), z.float(), 2e-2)


def _check_libdevice():
    import torch

    from linear_moe.kernels.testing import assert_rel_close

    x = torch.randn(N)
    y = torch.empty(N)
    libdevice_kernel[(1,)](x, y, N=N)
    assert_rel_close("libdevice tanh + log1p(exp)", torch.tanh(x) + torch.log1p(torch.exp(x)), y, 1e-6)


def _check_range():
    import torch

    from linear_moe.kernels.testing import assert_rel_close

    y = torch.empty(N)
    range_kernel[(1,)](y, 4, N=N)
    assert_rel_close("range loop variable .to()", sum(range(4)) * torch.arange(N).float(), y, 1e-6)


def _check_gather():
    global fla_op
    import torch

    import fla.ops.utils.op as fla_op

    x, index = torch.randn(N), torch.randperm(N)
    y = torch.empty(N)
    gather_kernel[(1,)](x, index, y, N=N)
    assert torch.equal(y, x[index])


def _check_all():
    for check in (_check_autotune, _check_bf16, _check_libdevice, _check_range, _check_gather):
        check()


#: patch -> (its check, a fragment of the failure message without the patch)
FAILURE_WITHOUT_PATCH = {
    "autotune": (_check_autotune, "0 active drivers"),
    "bf16": (_check_bf16, "bf16 tl.dot"),
    "libdevice": (_check_libdevice, "NoneType"),
    "range_to": (_check_range, "'int' object has no attribute 'to'"),
    "gather": (_check_gather, "Did you forget to add @triton.jit"),
}


def test_bf16_bit_conversion_matches_torch():
    import numpy as np
    import torch

    x = torch.randn(1000) * 100
    x[:3] = torch.tensor([float("nan"), float("inf"), -0.0])
    bits = f32_to_bf16_bits(x.numpy())
    expected = x.bfloat16().view(torch.int16).numpy().view(np.uint16)
    assert np.isnan(bf16_bits_to_f32(bits)[0])
    np.testing.assert_array_equal(bits[1:], expected[1:])
    np.testing.assert_array_equal(bf16_bits_to_f32(bits[1:]), x.bfloat16().float().numpy()[1:])


def test_enable_after_compiled_kernels_were_imported_is_refused(monkeypatch):
    import os

    from linear_moe.kernels.triton_cpu import enable_triton_interpreter, interpreter_enabled

    if interpreter_enabled():
        pytest.skip("this process already runs Triton interpreted")
    import linear_moe.kernels.lasp.compose  # noqa: F401 - decorates its kernels in compiled mode here

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="before TRITON_INTERPRET=1"):
        enable_triton_interpreter()
    assert "TRITON_INTERPRET" not in os.environ


def test_registry_lists_every_patch():
    assert set(FAILURE_WITHOUT_PATCH) == set(PATCHES)


@pytest.mark.slow
def test_patched_interpreter_matches_torch():
    run_interpreted(__file__, "_check_all")


@pytest.mark.slow
@pytest.mark.parametrize("patch", sorted(FAILURE_WITHOUT_PATCH))
def test_each_patch_is_needed(patch):
    check, fragment = FAILURE_WITHOUT_PATCH[patch]
    others = tuple(p for p in PATCHES if p != patch)
    proc = run_interpreted(__file__, check.__name__, patches=others, check=False)
    assert proc.returncode != 0, f"{check.__name__} passed without the {patch!r} patch"
    assert fragment in proc.stderr, f"unexpected failure without {patch!r}:\n{proc.stderr[-2000:]}"
