"""Run megatron-core 0.16.1 on a CPU-only machine with gloo: every CUDA-only call it makes, patched here.

This is the only module that patches megatron or ``torch.cuda`` for the CPU (``grouped_gemm.py``
supplies the ``gmm`` op megatron's grouped-GEMM experts import). Each entry of :data:`CPU_PATCHES`
names one incompatibility measured on a CPU-only host (see tests/model/megatron/test_cpu_compat.py,
which shows every unpatched call failing and passing after the patch). :func:`apply_cpu_patches` is
idempotent and does nothing when CUDA is available, except for the :data:`WITHOUT_TRANSFORMER_ENGINE`
patches that a GPU host without Transformer Engine needs as well. Patches whose failure needs two ranks
are probed by their own two-process test there. :func:`megatron_optimizer_on_cpu` is separate and
scoped: it lets tests run megatron's (CUDA-only) optimizer on CPU; the trainer never uses it.
"""
from __future__ import annotations

import contextlib
import copy
import functools
from typing import Callable

import torch

SUPPORTED_MEGATRON_VERSION = "0.16.1"


def check_megatron_version() -> str:
    """Return the installed megatron-core version; raise if the patches were not written for it."""
    import megatron.core

    version = getattr(megatron.core, "__version__", "unknown")
    if version != SUPPORTED_MEGATRON_VERSION:
        raise RuntimeError(
            f"linear_moe.model.megatron.cpu_compat is pinned to megatron-core=={SUPPORTED_MEGATRON_VERSION} "
            f"but megatron-core {version} is installed; install megatron-core=={SUPPORTED_MEGATRON_VERSION} "
            "(see constraints.txt) or re-check every patch in this module against the new version"
        )
    return version


# ---------------------------------------------------------------------- stand-ins for CUDA objects
class CpuStream:
    """Stands in for ``torch.cuda.Stream``: CPU work is already ordered, so every method is a no-op."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def record_event(self, event=None):
        return event if event is not None else CpuEvent()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class CpuEvent:
    """Stands in for ``torch.cuda.Event``; timings come from ``time.perf_counter``."""

    def __init__(self, *args, **kwargs):
        self._time = None

    def record(self, stream=None) -> None:
        import time

        self._time = time.perf_counter()

    def wait(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, end: "CpuEvent") -> float:
        """Milliseconds between two recorded events."""
        return (end._time - self._time) * 1e3


_DEFAULT_STREAM = CpuStream()


# ---------------------------------------------------------------------- the patches
def _patch_current_device() -> None:
    # megatron allocates with device=torch.cuda.current_device(); "cpu" is a valid device there.
    torch.cuda.current_device = lambda: "cpu"


def _patch_synchronize() -> None:
    torch.cuda.synchronize = lambda device=None: None


def _patch_stream() -> None:
    torch.cuda.Stream = CpuStream
    torch.cuda.current_stream = lambda device=None: _DEFAULT_STREAM
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()


def _patch_event() -> None:
    torch.cuda.Event = CpuEvent


def _patch_rng_tracker() -> None:
    # The TP RNG tracker keeps one generator state per name and swaps it in and out; on CPU the
    # state it swaps is the default CPU generator's.
    from megatron.core.tensor_parallel import random as tp_random

    def get_state(device="cuda", clone=False, graph_safe=False):
        return torch.get_rng_state()

    def set_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        saved = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(saved)

    tp_random._get_cuda_rng_state = get_state
    tp_random._set_cuda_rng_state = set_state
    tp_random.CudaRNGStatesTracker.add = add


def _patch_te_general_gemm() -> None:
    # moe_utils only binds te_general_gemm when Transformer Engine imports; the router GEMM then
    # raises NameError. None selects its torch.mm fallback.
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _as_split_list(splits):
    if splits is None or isinstance(splits, list):
        return splits
    if isinstance(splits, torch.Tensor):
        return [int(s) for s in splits.tolist()]
    return [int(s) for s in splits]  # numpy array or tuple


def _patch_alltoall_split_sizes() -> None:
    # The alltoall dispatcher passes split sizes as tensors / numpy arrays; gloo's
    # all_to_all_single only accepts lists of ints.
    from megatron.core.transformer.moe import token_dispatcher

    original = token_dispatcher.all_to_all

    @functools.wraps(original)
    def all_to_all(group, input_, output_split_sizes=None, input_split_sizes=None):
        return original(group, input_, _as_split_list(output_split_sizes), _as_split_list(input_split_sizes))

    token_dispatcher.all_to_all = all_to_all


def _gather_uneven(input_: torch.Tensor, group, sizes: list[int]) -> torch.Tensor:
    """All-gather along dim 0 where rank r holds ``sizes[r]`` rows: padded to the largest, then trimmed."""
    if input_.shape[0] != sizes[group.rank()]:
        raise ValueError(f"uneven gather: rank {group.rank()} holds {input_.shape[0]} rows, split sizes say {sizes}")
    padded = input_.new_zeros((max(sizes), *input_.shape[1:]))
    padded[: input_.shape[0]] = input_
    pieces = [torch.empty_like(padded) for _ in sizes]
    torch.distributed.all_gather(pieces, padded, group=group)
    return torch.cat([piece[:size] for piece, size in zip(pieces, sizes)])


def _patch_uneven_sequence_parallel_gather() -> None:
    # Under TP with EP, the alltoall dispatcher all-gathers every TP rank's routed tokens in uneven
    # counts (output_split_sizes); gloo's all_gather takes equal sizes only. (Its reduce_scatter, the
    # backward, accepts uneven pieces.)
    from megatron.core.tensor_parallel import mappings

    original = mappings._gather_along_first_dim

    @functools.wraps(original)
    def gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return original(input_, group, output_split_sizes, use_global_buffer)
        return _gather_uneven(input_, group, _as_split_list(output_split_sizes))

    mappings._gather_along_first_dim = gather_along_first_dim


def _patch_torch_norm_sequence_parallel() -> None:
    # WrappedTorchNorm asserts not sequence_parallel, but MoE with TP>1 requires it. A torch norm is
    # correct under SP as long as its parameters are marked, so that finalize_model_grads sums their
    # gradients over the TP group (as megatron does for its fused norms).
    from megatron.core.transformer import torch_norm

    original_new = torch_norm.WrappedTorchNorm.__new__

    def __new__(cls, config, hidden_size, eps=1e-5, **kwargs):
        plain_config = copy.copy(config)
        plain_config.sequence_parallel = False
        norm = original_new(cls, plain_config, hidden_size, eps, **kwargs)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm

    torch_norm.WrappedTorchNorm.__new__ = __new__


class _CpuDeviceTorch:
    """Module-level stand-in for ``torch`` whose tensor factories map ``device="cuda"`` to the CPU."""

    _FACTORIES = ("zeros", "ones", "empty", "tensor", "full", "arange")

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name):
        value = getattr(self._module, name)
        if name in self._FACTORIES:
            return functools.partial(_cpu_factory, value)
        return value


def _cpu_factory(factory, *args, **kwargs):
    device = kwargs.get("device")
    if device is not None and torch.device(device).type == "cuda":
        kwargs["device"] = "cpu"
    return factory(*args, **kwargs)


def _patch_hardcoded_cuda_device() -> None:
    # The schedules count tokens in torch.zeros(..., device="cuda"); the MoE aux-loss tracker
    # allocates its buffer the same way. Only these modules' view of ``torch`` changes.
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.transformer.moe import moe_utils

    for module in (schedules, moe_utils):
        if not isinstance(module.torch, _CpuDeviceTorch):
            module.torch = _CpuDeviceTorch(torch)


# ---------------------------------------------------------------- megatron's optimizer (tests only)
#: megatron modules whose optimizer code allocates scratch tensors with ``device="cuda"``
_OPTIMIZER_MODULES = (
    "megatron.core.optimizer.optimizer", "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.clip_grads", "megatron.core.utils",
)


@contextlib.contextmanager
def megatron_optimizer_on_cpu():
    """Run megatron-core's optimizer (``get_megatron_optimizer``: FP32Optimizer, DistributedOptimizer)
    on CPU fp32 parameters, so tests can prove it by equivalence on gloo. Not used by the trainer,
    which takes torch AdamW on CPU (``TrainConfig.optimizer``).

    Two things stop it on a CPU: it checks ``param.type() == "torch.cuda.FloatTensor"`` (and asserts
    the same of gradients before clipping), and it allocates scratch tensors (norms, overflow flags,
    loss scale) with ``device="cuda"``. Inside this context ``Tensor.type()`` without arguments names
    CPU tensors by their CUDA type, and those modules' tensor factories allocate on the CPU. Both are
    undone on exit. Not idempotent across threads; the optimizer's arithmetic is untouched.
    """
    import importlib

    check_megatron_version()
    modules = [importlib.import_module(name) for name in _OPTIMIZER_MODULES]
    saved_torch = [module.torch for module in modules]
    saved_type = torch.Tensor.type

    def cuda_type_name(self, *args, **kwargs):
        if args or kwargs or self.is_cuda:
            return saved_type(self, *args, **kwargs)
        return saved_type(self).replace("torch.", "torch.cuda.", 1)

    torch.Tensor.type = cuda_type_name
    for module in modules:
        module.torch = _CpuDeviceTorch(torch)
    try:
        yield
    finally:
        torch.Tensor.type = saved_type
        for module, original in zip(modules, saved_torch):
            module.torch = original


#: name -> function that installs the patch. Order matters only in that all are applied together.
CPU_PATCHES: dict[str, Callable[[], None]] = {
    "current_device": _patch_current_device,
    "synchronize": _patch_synchronize,
    "stream": _patch_stream,
    "event": _patch_event,
    "rng_tracker": _patch_rng_tracker,
    "te_general_gemm": _patch_te_general_gemm,
    "alltoall_split_sizes": _patch_alltoall_split_sizes,
    "uneven_sequence_parallel_gather": _patch_uneven_sequence_parallel_gather,
    "torch_norm_sequence_parallel": _patch_torch_norm_sequence_parallel,
    "hardcoded_cuda_device": _patch_hardcoded_cuda_device,
}

#: the patches a GPU host without Transformer Engine (and Apex) needs too: the router GEMM's fallback,
#: and torch norms under megatron's sequence parallelism (on whenever TP > 1)
WITHOUT_TRANSFORMER_ENGINE: tuple[str, ...] = ("te_general_gemm", "torch_norm_sequence_parallel")

_APPLIED: set[str] = set()


def apply_cpu_patches(names: tuple[str, ...] | None = None, force: bool = False) -> list[str]:
    """Install the CPU patches (all, or ``names``) once; return the names applied so far.

    Does nothing when CUDA is available unless ``force`` (tests). Raises ``RuntimeError`` when the
    installed megatron-core is not the pinned version, ``ValueError`` for an unknown patch name.
    """
    if torch.cuda.is_available() and not force:
        return sorted(_APPLIED)
    check_megatron_version()
    selected = tuple(CPU_PATCHES) if names is None else names
    for name in selected:
        if name not in CPU_PATCHES:
            raise ValueError(f"unknown CPU patch {name!r}; known patches: {sorted(CPU_PATCHES)}")
        if name not in _APPLIED:
            CPU_PATCHES[name]()
            _APPLIED.add(name)
    return sorted(_APPLIED)
