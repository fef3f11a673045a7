"""What the GPU compiler makes of a Triton kernel, ahead of time and without a GPU.

``triton.compile`` builds the cubin for a named target on any machine; cuobjdump (shipped in the
Triton wheel) reads its registers, stack frame and shared memory. A stack frame in a kernel without
calls means register spills.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

HOPPER = GPUTarget("cuda", 90, 32)
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def resource_usage(kernel, signature: dict[str, str], constexprs: dict, target: GPUTarget = HOPPER,
                   num_warps: int = 4) -> dict[str, int]:
    """cuobjdump's ``REG``, ``STACK``, ``SHARED`` and ``LOCAL`` of ``kernel`` compiled for ``target``.

    ``signature`` maps every argument to a Triton type (``*bf16``, ``i32``, ``constexpr``, ...);
    ``constexprs`` gives the constexpr values. Raises FileNotFoundError without cuobjdump.
    """
    if not os.path.exists(CUOBJDUMP):
        raise FileNotFoundError(f"no cuobjdump in the Triton wheel ({CUOBJDUMP})")
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs), target=target,
                              options={"num_warps": num_warps})
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        out = subprocess.run([CUOBJDUMP, "--dump-resource-usage", cubin], capture_output=True, text=True,
                             check=True).stdout
    line = next(l for l in out.splitlines() if "REG:" in l)
    return {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line)}
