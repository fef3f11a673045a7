"""Our Triton kernels compile for Hopper (sm_90a) ahead of time, on a machine without a GPU.

The interpreter tests check what the kernels compute; this checks what the GPU compiler makes of
them (bf16 activations, fp32 states): each compiles to a cubin, and the LASP-2 state-correction
kernels keep their tiles in registers at head dims K, V of 64 to 256 (no stack frame, i.e. no
spills; cuobjdump's resource usage). A first backward kernel that ran one program per (b, h) over
all of T compiled to 32 registers and a 6.6 KB stack frame per thread at K = V = 128, and on an H200
its forward+backward took 3x PyTorch autograd's; the first forward, one (T, V) tile per program,
spilled at K = 64, V = 128 and at V = 256.

The prefix-composition kernels compile, but with the delta rule's (K, K) transitions they spill
(about 27 KB of stack per thread), which is recorded here and not asserted.
"""
from __future__ import annotations

import os
import re
import subprocess

import pytest
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from linear_moe.kernels.lasp import compose, correction

HOPPER = GPUTarget("cuda", 90, 32)
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
_TILES = {"K": "constexpr", "V": "constexpr", "BT": "constexpr", "BK": "constexpr", "BV": "constexpr",
          "HAS_G": "constexpr"}


def correction_kernels(K: int, V: int) -> dict:
    """name -> (jitted kernel, argument types, constexprs), with the tiles the host code launches at (K, V)."""
    c = correction
    return {
        "forward": (c._correction_fwd_kernel,
                    {"o": "*bf16", "q": "*bf16", "g": "*fp32", "s": "*fp32", "out": "*bf16", "T": "i32", "H": "i32",
                     "scale": "fp32", **_TILES},
                    {"K": K, "V": V, "HAS_G": True, "BT": c._BT, "BK": c.block(K), "BV": min(c._BV_FWD, c.block(V))}),
        "backward_dq": (c._correction_bwd_dq_kernel,
                        {"d_out": "*bf16", "q": "*bf16", "g": "*fp32", "s": "*fp32", "d_q": "*fp32", "d_g": "*fp32",
                         "T": "i32", "H": "i32", "scale": "fp32", **_TILES},
                        {"K": K, "V": V, "HAS_G": True, "BT": c._BT_DQ, "BK": min(c._BK_DQ, c.block(K)),
                         "BV": c.block(V)}),
        "backward_ds": (c._correction_bwd_ds_kernel,
                        {"d_out": "*bf16", "q": "*bf16", "g": "*fp32", "d_s_parts": "*fp32", "T": "i32", "H": "i32",
                         "scale": "fp32", "T_SPLIT": "i32", **_TILES},
                        {"K": K, "V": V, "HAS_G": True, "BT": c._BT_DS, "BK": min(c._BK_DS, c.block(K)),
                         "BV": min(c._BV_DS, c.block(V))}),
    }


_COMPOSE_TILES = {"K": "constexpr", "V": "constexpr", "BK": "constexpr", "BV": "constexpr", "MATRIX": "constexpr"}
COMPOSE_KERNELS = {
    "prefix_forward": (compose._prefix_compose_fwd_kernel,
                       {"a": "*fp32", "b": "*fp32", "s0": "*fp32", "states": "*fp32", "W": "i32", "NH": "i32",
                        **_COMPOSE_TILES}),
    "suffix_backward": (compose._suffix_compose_bwd_kernel,
                        {"a": "*fp32", "states": "*fp32", "d_states": "*fp32", "d_a": "*fp32", "d_b": "*fp32",
                         "d_s0": "*fp32", "W": "i32", "NH": "i32", **_COMPOSE_TILES}),
}


def _resource_usage(kernel, signature, constexprs, tmp_path) -> dict[str, int]:
    """Compile for sm_90a; return cuobjdump's REG / STACK / SHARED / LOCAL of the kernel."""
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs), target=HOPPER)
    assert compiled.asm["cubin"], "no cubin"
    if not os.path.exists(CUOBJDUMP):
        pytest.skip(f"no cuobjdump in the Triton wheel ({CUOBJDUMP})")
    cubin = tmp_path / f"{kernel.fn.__name__}.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    proc = subprocess.run([CUOBJDUMP, "--dump-resource-usage", str(cubin)], capture_output=True, text=True, check=True)
    line = next(l for l in proc.stdout.splitlines() if "REG:" in l)
    return {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line)}


@pytest.mark.parametrize("K, V", [(64, 128), (128, 128), (128, 256)], ids=["K64-V128", "K128-V128", "K128-V256"])
@pytest.mark.parametrize("name", ["forward", "backward_dq", "backward_ds"])
def test_state_correction_kernel_compiles_for_hopper_without_spills(name, K, V, tmp_path):
    usage = _resource_usage(*correction_kernels(K, V)[name], tmp_path)
    assert usage["STACK"] == 0 and usage["LOCAL"] == 0, f"{name} spills on sm_90a at K={K}, V={V}: {usage}"


@pytest.mark.parametrize("matrix", [False, True], ids=["decay", "delta-rule"])
@pytest.mark.parametrize("name", sorted(COMPOSE_KERNELS))
def test_prefix_composition_kernel_compiles_for_hopper(name, matrix, tmp_path):
    kernel, signature = COMPOSE_KERNELS[name]
    usage = _resource_usage(kernel, signature, {"K": 128, "V": 128, "BK": 128, "BV": 128, "MATRIX": matrix}, tmp_path)
    assert usage["REG"] > 0, usage
