"""Run Triton kernels on a CPU: ``TRITON_INTERPRET=1`` plus patches for Triton 3.9 interpreter gaps.

Gaps patched (each is a registry entry in :data:`PATCHES`, applied by :func:`enable_triton_interpreter`):

* ``autotune``  - ``@triton.autotune`` benchmarks every config, which needs a GPU driver: keep one
  config of those that survive the kernel's own pruning (``kernels.autotune.limit_autotune(1)``).
* ``bf16``      - bf16 tensors are stored as raw ``uint16`` bits and ``tl.dot`` / elementwise ops
  compute on those bits (garbage or NaN): upcast to fp32, compute, round back to bf16 (RNE).
* ``libdevice`` - ``triton.language.extra.libdevice`` functions are stubs returning ``None``:
  replace the ones fla uses (exp, log, tanh, log1p, fast_* ...) with NumPy implementations.
* ``range_to``  - ``for i in range(n)`` / ``tl.range`` yields Python ints, so ``i.to(tl.int64)``
  fails: loop variables become int32 scalar tensors, as in compiled Triton.
* ``gather``    - fla aliases ``tl.gather`` as ``fla.ops.utils.op.gather``; the interpreter only
  patches builtins reached through ``tl`` inside a jitted function, so the alias raises ("Did you
  forget to add @triton.jit"): it becomes a jitted function calling ``tl.gather`` (fla's DPLR/RWKV7).

Order matters: ``triton.jit`` picks interpreter or compiler when a kernel is *decorated*, so the
environment variable must be set before any module defining kernels (fla, ``kernels/lasp``) is
imported. Tests therefore run interpreter code in a fresh process::

    from linear_moe.kernels.triton_cpu import run_interpreted
    run_interpreted(__file__, "_check_bf16_dot")   # calls _check_bf16_dot() in a subprocess

and a script does ``enable_triton_interpreter()`` as its first statement. Patches are global and
idempotent; a process that imported kernels in compiled mode gets a ``RuntimeError``.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import triton.language as tl  # the module jitted helpers below reach builtins through (no kernel is decorated here)

PATCHES: dict[str, Callable[[], None]] = {}
_APPLIED: set[str] = set()


def register_patch(name: str) -> Callable[[Callable[[], None]], Callable[[], None]]:
    def decorator(fn: Callable[[], None]) -> Callable[[], None]:
        PATCHES[name] = fn
        return fn

    return decorator


def enable_triton_interpreter(patches: tuple[str, ...] | None = None) -> None:
    """Set ``TRITON_INTERPRET=1`` and apply ``patches`` (default: all of :data:`PATCHES`)."""
    names = tuple(PATCHES) if patches is None else patches
    unknown = sorted(set(names) - set(PATCHES))
    if unknown:
        raise ValueError(f"enable_triton_interpreter: unknown patch(es) {unknown}; known: {sorted(PATCHES)}")
    _check_no_compiled_kernels()
    os.environ["TRITON_INTERPRET"] = "1"
    for name in names:
        if name not in _APPLIED:
            PATCHES[name]()
            _APPLIED.add(name)


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check_no_compiled_kernels() -> None:
    """Fail loudly when kernels were decorated before the interpreter was switched on."""
    from triton.runtime.jit import JITFunction

    for mod_name in ("linear_moe.kernels.lasp.compose", "linear_moe.kernels.lasp.correction", "fla.ops.utils.op"):
        module = sys.modules.get(mod_name)
        if module is None:
            continue
        if any(isinstance(v, JITFunction) for v in vars(module).values()):
            raise RuntimeError(
                f"enable_triton_interpreter: {mod_name} was imported before TRITON_INTERPRET=1, so its "
                "kernels are compiled-mode; call enable_triton_interpreter() first (or use run_interpreted)"
            )


# ---------------------------------------------------------------------------------- autotune
@register_patch("autotune")
def _patch_autotune() -> None:
    from linear_moe.kernels.autotune import limit_autotune

    limit_autotune(1)


# ---------------------------------------------------------------------------------- bf16
def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """``uint16`` bf16 bit patterns -> float32 values (exact)."""
    return (np.asarray(bits).astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 values -> ``uint16`` bf16 bit patterns, round-to-nearest-even, NaN kept NaN."""
    x = np.asarray(x, dtype=np.float32)
    u32 = x.view(np.uint32)
    rounded = ((u32 + (((u32 >> 16) & 1) + 0x7FFF)) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), rounded)


def _is_bf16(handle) -> bool:
    import triton.language as tl

    return getattr(handle.dtype, "scalar", handle.dtype) == tl.bfloat16 and handle.data.dtype == np.uint16


def _as_f32(handle) -> np.ndarray:
    return bf16_bits_to_f32(handle.data) if _is_bf16(handle) else handle.data


@register_patch("bf16")
def _patch_bf16() -> None:
    from triton.runtime.interpreter import InterpreterBuilder, TensorHandle

    binary_op, unary_op, create_dot = (InterpreterBuilder.binary_op, InterpreterBuilder.unary_op,
                                       InterpreterBuilder.create_dot)
    ternary_op, create_fma = InterpreterBuilder.ternary_op, InterpreterBuilder.create_fma

    def _back(out: np.ndarray, dtype):
        return TensorHandle(f32_to_bf16_bits(out) if out.dtype.kind == "f" else out, dtype)

    def bf16_binary_op(self, lhs, rhs, op):
        if not (_is_bf16(lhs) or _is_bf16(rhs)):
            return binary_op(self, lhs, rhs, op)
        return _back(op(_as_f32(lhs), _as_f32(rhs)), lhs.dtype.scalar)

    def bf16_unary_op(self, arg, op):
        if not _is_bf16(arg):
            return unary_op(self, arg, op)
        return _back(op(_as_f32(arg)), arg.dtype.scalar)

    def bf16_ternary_op(self, lhs, rhs, other, op):
        # select(cond, a, b) and clamp: only the value operands carry bf16 bits, and where() on
        # bits is exact, so only arithmetic (clip) needs the upcast.
        if op is np.where or not (_is_bf16(rhs) or _is_bf16(other)):
            return ternary_op(self, lhs, rhs, other, op)
        return _back(op(_as_f32(lhs), _as_f32(rhs), _as_f32(other)), other.dtype.scalar)

    def bf16_fma(self, x, y, z):
        if not any(_is_bf16(h) for h in (x, y, z)):
            return create_fma(self, x, y, z)
        return _back(_as_f32(x) * _as_f32(y) + _as_f32(z), z.dtype.scalar)

    def bf16_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if not any(_is_bf16(h) for h in (a, b, d)):
            return create_dot(self, a, b, d, input_precision, max_num_imprecise_acc)
        out = np.matmul(_as_f32(a), _as_f32(b), dtype=np.float32) + _as_f32(d)
        return _back(out, d.dtype.scalar) if _is_bf16(d) else TensorHandle(out.astype(d.data.dtype), d.dtype.scalar)

    InterpreterBuilder.binary_op = bf16_binary_op
    InterpreterBuilder.unary_op = bf16_unary_op
    InterpreterBuilder.ternary_op = bf16_ternary_op
    InterpreterBuilder.create_fma = bf16_fma
    InterpreterBuilder.create_dot = bf16_dot
    for name in ("create_rsqrt", "create_erf"):
        _wrap_unary_method(InterpreterBuilder, name, TensorHandle)


def _wrap_unary_method(cls, name: str, handle_cls) -> None:
    """Methods that read ``arg.data`` directly instead of going through ``unary_op``."""
    original = getattr(cls, name)
    import triton.language as tl

    def wrapped(self, arg):
        if not _is_bf16(arg):
            return original(self, arg)
        out = original(self, handle_cls(bf16_bits_to_f32(arg.data), tl.float32))
        return handle_cls(f32_to_bf16_bits(out.data), arg.dtype.scalar)

    setattr(cls, name, wrapped)


# ---------------------------------------------------------------------------------- libdevice
def _erf(x):
    import math

    return np.vectorize(math.erf, otypes=[x.dtype])(x)


def _round_half_away(x):
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


#: libdevice name -> NumPy implementation (arguments are NumPy arrays of one float dtype)
LIBDEVICE_FUNCTIONS: dict[str, Callable[..., np.ndarray]] = {
    "exp": np.exp, "fast_expf": np.exp, "exp2": np.exp2, "expm1": np.expm1,
    "log": np.log, "fast_logf": np.log, "log2": np.log2, "fast_log2f": np.log2, "log1p": np.log1p,
    "log10": np.log10, "fast_log10f": np.log10,
    "tanh": np.tanh, "fast_tanhf": np.tanh, "sin": np.sin, "fast_sinf": np.sin, "cos": np.cos,
    "fast_cosf": np.cos, "sqrt": np.sqrt, "rsqrt": lambda x: 1 / np.sqrt(x), "abs": np.abs,
    "floor": np.floor, "ceil": np.ceil, "trunc": np.trunc, "round": _round_half_away, "rint": np.rint,
    "erf": _erf, "pow": np.power, "fast_powf": np.power, "fast_dividef": np.divide, "div_rn": np.divide,
    "fmax": np.fmax, "fmin": np.fmin, "isnan": np.isnan, "isinf": np.isinf,
}


def _libdevice_impl(name: str, np_fn: Callable[..., np.ndarray]):
    def impl(*args, _semantic=None, **_):
        import triton.language as tl
        from triton.runtime.interpreter import TensorHandle

        tensors = [a for a in args if isinstance(a, tl.tensor)]
        if not tensors:
            raise TypeError(f"libdevice.{name}: expected at least one tl.tensor argument, got {args}")
        ref = tensors[0]
        arrays = [_as_f32(a.handle) if isinstance(a, tl.tensor) else np.asarray(a) for a in args]
        out = np.asarray(np_fn(*arrays))
        if out.dtype == np.bool_:
            return tl.tensor(TensorHandle(out, tl.int1), ref.type.with_element_ty(tl.int1)
                             if ref.type.is_block() else tl.int1)
        if _is_bf16(ref.handle):
            return tl.tensor(TensorHandle(f32_to_bf16_bits(out), ref.dtype), ref.type)
        return tl.tensor(TensorHandle(out.astype(ref.handle.data.dtype), ref.dtype), ref.type)

    impl.__name__ = name
    return impl


@register_patch("libdevice")
def _patch_libdevice() -> None:
    import triton.language.extra.libdevice as libdevice

    modules = [libdevice]
    cuda = sys.modules.get("triton.language.extra.cuda.libdevice")
    if cuda is not None:
        modules.append(cuda)
    for module in modules:
        for name, np_fn in LIBDEVICE_FUNCTIONS.items():
            setattr(module, name, _libdevice_impl(name, np_fn))


# ---------------------------------------------------------------------------------- range
def _is_range_call(node: ast.expr) -> bool:
    """``range(...)`` or ``tl.range(...)``; not ``tl.static_range`` (constexpr in compiled Triton)."""
    if not isinstance(node, ast.Call):
        return False
    func = node.func
    return (isinstance(func, ast.Name) and func.id == "range") or (
        isinstance(func, ast.Attribute) and func.attr == "range")


@register_patch("range_to")
def _patch_range() -> None:
    from triton.runtime.interpreter import ASTTransformer

    def visit_For(self, node: ast.For):
        node = self.generic_visit(node)
        if _is_range_call(node.iter) and isinstance(node.target, ast.Name):
            # `i = i` goes through visit_Assign, which wraps it in interpreter_semantic.to_tensor
            rebind = ast.Assign(targets=[ast.Name(id=node.target.id, ctx=ast.Store())],
                                value=ast.Name(id=node.target.id, ctx=ast.Load()))
            node.body.insert(0, self.visit_Assign(rebind))
        return node

    ASTTransformer.visit_For = visit_For


# ---------------------------------------------------------------------------------- gather
def _gather(src, index, axis):
    """Body of the jitted stand-in for fla's ``gather`` alias (decorated once the interpreter is on)."""
    return tl.gather(src, index, axis)


@register_patch("gather")  # registered last: it imports fla, so every other patch is in place first
def _patch_gather() -> None:
    import triton

    import fla.ops.utils.op as fla_op

    jitted = triton.jit(_gather)
    for name, module in [("fla.ops.utils.op", fla_op), *sys.modules.items()]:
        if name.startswith("fla.") and getattr(module, "gather", None) is tl.gather:
            module.gather = jitted  # later imports of the alias read fla.ops.utils.op's, patched first


# ---------------------------------------------------------------------------------- subprocess runner
_RUNNER = """
import importlib.util, sys
patches = sys.argv[3]
if patches != "-":
    from linear_moe.kernels.triton_cpu import enable_triton_interpreter
    enable_triton_interpreter(tuple(p for p in patches.split(",") if p))
else:
    import os; os.environ["TRITON_INTERPRET"] = "1"
spec = importlib.util.spec_from_file_location("_interpreted_module", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
getattr(module, sys.argv[2])()
"""


def run_interpreted(path: str | Path, function: str, *, patches: tuple[str, ...] | None = None,
                    check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    """Call ``function()`` from the Python file ``path`` in a fresh interpreter-mode process.

    ``patches=None`` applies all patches, ``()`` none (``TRITON_INTERPRET=1`` only). With ``check``,
    a non-zero exit raises ``AssertionError`` carrying the child's stderr tail.
    """
    arg = "-" if patches == () else ",".join(PATCHES if patches is None else patches)
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _RUNNER, str(path), function, arg], env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{Path(path).name}::{function} failed under the Triton interpreter "
                             f"(patches={arg}):\n{proc.stderr[-4000:]}")
    return proc

