"""Our Triton kernels compile for Hopper (sm_90a) ahead of time, on a machine without a GPU.

The interpreter tests check what the kernels compute; this checks what the GPU compiler makes of
them (bf16 activations, fp32 states; cuobjdump's resource usage) at head dims K, V of 64 to 256:

* the state-correction forward (fp32 FMA dots) keeps its tiles in registers: no stack frame;
* the backward's two kernels (tf32x3 tensor-core dots) spill little: at most 1 KB of stack per thread.

What the bounds stand for, measured on an H200 (Triton 3.6, K = V = 128): forwards that held all of K
in one FMA dot compiled to 32 registers and a 3.4 to 7 KB stack per thread, and one of them took 8.4x
PyTorch's time; a backward running one program per (b, h) had a 6.6 KB stack and took 3x autograd's.
The default backward, with a 120-byte stack in its dq kernel, took 0.29x PyTorch's
(benchmarks/bench_lasp_tiles.py). The same checks were run by hand under Triton 3.6, the GPU
machine's, as well as under the installed Triton that CI runs them with.

The prefix-composition kernels compile, but with the delta rule's (K, K) transitions they spill
(about 27 KB of stack per thread), which is recorded here and not asserted.
"""
from __future__ import annotations

import pytest

from linear_moe.kernels.lasp import compose, correction
from linear_moe.kernels.resources import resource_usage


_COMPOSE_TILES = {"K": "constexpr", "V": "constexpr", "BK": "constexpr", "BV": "constexpr", "MATRIX": "constexpr"}
COMPOSE_KERNELS = {
    "prefix_forward": (compose._prefix_compose_fwd_kernel,
                       {"a": "*fp32", "b": "*fp32", "s0": "*fp32", "states": "*fp32", "W": "i32", "NH": "i32",
                        **_COMPOSE_TILES}),
    "suffix_backward": (compose._suffix_compose_bwd_kernel,
                        {"a": "*fp32", "states": "*fp32", "d_states": "*fp32", "d_a": "*fp32", "d_b": "*fp32",
                         "d_s0": "*fp32", "W": "i32", "NH": "i32", **_COMPOSE_TILES}),
}


def _resource_usage(kernel, signature, constexprs, num_warps=4) -> dict[str, int]:
    try:
        return resource_usage(kernel, signature, constexprs, num_warps=num_warps)
    except FileNotFoundError as err:
        pytest.skip(str(err))


#: bytes of stack per thread each state-correction kernel may use (see the module docstring)
STACK_BOUND = {"forward": 0, "backward_dq": 1024, "backward_ds": 1024}


@pytest.mark.parametrize("K, V", [(64, 128), (128, 128), (128, 256), (256, 256)],
                         ids=["K64-V128", "K128-V128", "K128-V256", "K256-V256"])
@pytest.mark.parametrize("name", sorted(STACK_BOUND))
def test_state_correction_kernel_compiles_for_hopper_within_its_stack_bound(name, K, V):
    usage = _resource_usage(correction.KERNELS[name], correction.ARG_TYPES[name],
                            correction.launch_constexprs(K, V, has_g=True)[name], num_warps=correction.TILES.num_warps)
    assert usage["STACK"] <= STACK_BOUND[name] and usage["LOCAL"] == 0, \
        f"{name} spills on sm_90a at K={K}, V={V}: {usage} (bound: {STACK_BOUND[name]} bytes of stack)"


@pytest.mark.parametrize("matrix", [False, True], ids=["decay", "delta-rule"])
@pytest.mark.parametrize("name", sorted(COMPOSE_KERNELS))
def test_prefix_composition_kernel_compiles_for_hopper(name, matrix):
    kernel, signature = COMPOSE_KERNELS[name]
    usage = _resource_usage(kernel, signature, {"K": 128, "V": 128, "BK": 128, "BV": 128, "MATRIX": matrix})
    assert usage["REG"] > 0, usage
