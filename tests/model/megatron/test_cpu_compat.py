"""Each CPU patch is needed (the unpatched megatron/torch call fails here) and works once applied.

The probes run in a fresh subprocess so that the patches do not leak into other tests: first every
probe without patches, then every probe after ``apply_cpu_patches()``.
"""
import json
import subprocess
import sys
import textwrap

import pytest
import torch

from linear_moe.model.megatron import cpu_compat

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the patches only apply on CPU-only hosts")

PROBES = {
    "current_device": """
        x = torch.empty(3, device=torch.cuda.current_device())
        assert x.device.type == "cpu"
    """,
    "synchronize": """
        torch.cuda.synchronize()
    """,
    "stream": """
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            y = torch.ones(2) * 2
        assert y.sum() == 4
    """,
    "event": """
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(); end.record(); end.synchronize()
        assert start.elapsed_time(end) >= 0
    """,
    "rng_tracker": """
        from megatron.core.tensor_parallel.random import CudaRNGStatesTracker
        tracker = CudaRNGStatesTracker()
        tracker.add("model-parallel-rng", 1234)
        before = torch.get_rng_state()
        with tracker.fork("model-parallel-rng"):
            forked = torch.rand(4)
        torch.manual_seed(1234)
        reference = torch.rand(4)
        assert torch.equal(forked, reference), "fork must draw from the tracked seed"
        torch.set_rng_state(before)
        with tracker.fork("model-parallel-rng"):
            second = torch.rand(4)
        torch.manual_seed(1234); torch.rand(4)
        assert torch.equal(second, torch.rand(4)), "the tracked state must advance"
    """,
    "te_general_gemm": """
        from megatron.core.transformer.moe import moe_utils
        inp, weight = torch.randn(5, 8), torch.randn(4, 8)
        out = moe_utils.router_gating_linear(inp, weight, None, torch.float32)
        assert torch.allclose(out, inp @ weight.T, rtol=1e-5, atol=1e-6)
    """,
    "alltoall_split_sizes": """
        from megatron.core.transformer.moe import moe_utils, token_dispatcher
        from linear_moe.model.megatron.cpu_compat import _as_split_list
        import torch.distributed as dist
        # splits exactly as the alltoall dispatcher hands them over on CPU
        splits = moe_utils.maybe_move_tensor_to_cpu(torch.tensor([4]), as_numpy=True)
        if getattr(token_dispatcher.all_to_all, "__wrapped__", None) is not None:
            splits = _as_split_list(splits)
        x, out = torch.arange(4.0), torch.empty(4)
        dist.all_to_all_single(out, x, output_split_sizes=splits, input_split_sizes=splits)
        assert torch.equal(out, x)
    """,
    "torch_norm_sequence_parallel": """
        from megatron.core.transformer import TransformerConfig
        from megatron.core.transformer.torch_norm import WrappedTorchNorm
        config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2, normalization="RMSNorm",
                                   tensor_model_parallel_size=2, sequence_parallel=True)
        norm = WrappedTorchNorm(config, 8, eps=1e-6)
        assert norm.weight.sequence_parallel is True
        x = torch.randn(3, 8)
        reference = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        assert torch.allclose(norm(x), reference, atol=1e-6)
    """,
    "hardcoded_cuda_device": """
        from megatron.core.pipeline_parallel import schedules
        total = schedules.torch.zeros([], dtype=torch.int, device="cuda")
        assert total.device.type == "cpu"
    """,
}

SCRIPT = """
import json, sys, textwrap, warnings
warnings.simplefilter("ignore")
import torch, torch.distributed as dist
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # a world of one: no rendezvous
probes = json.loads(sys.argv[1])

def run_all():
    results = {}
    for name, body in probes.items():
        try:
            exec(textwrap.dedent(body), {"torch": torch})
            results[name] = "ok"
        except BaseException as error:
            results[name] = f"{type(error).__name__}: {error}"[:300]
    return results

unpatched = run_all()
from linear_moe.model.megatron.cpu_compat import apply_cpu_patches
from megatron.core.transformer.moe import token_dispatcher
applied = apply_cpu_patches()
wrapped = token_dispatcher.all_to_all
apply_cpu_patches()
idempotent = token_dispatcher.all_to_all is wrapped
print(json.dumps(dict(unpatched=unpatched, patched=run_all(), applied=applied, idempotent=idempotent)))
"""


@pytest.fixture(scope="module")
def results():
    probes = {name: textwrap.dedent(body) for name, body in PROBES.items()}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(probes)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


#: patches whose failure needs two ranks: probed by their own two-process test below
TWO_RANK_PATCHES = {"uneven_sequence_parallel_gather"}


def test_every_patch_has_a_probe():
    assert set(PROBES) | TWO_RANK_PATCHES == set(cpu_compat.CPU_PATCHES)


@pytest.mark.parametrize("name", sorted(PROBES))
def test_unpatched_call_fails(results, name):
    assert results["unpatched"][name] != "ok", f"{name}: the unpatched call succeeded, so the patch is not needed"


@pytest.mark.parametrize("name", sorted(PROBES))
def test_patched_call_works(results, name):
    assert results["patched"][name] == "ok", f"{name}: {results['patched'][name]}"


def test_apply_is_idempotent(results):
    assert results["applied"] == sorted(cpu_compat.CPU_PATCHES)
    assert results["idempotent"], "a second apply_cpu_patches() wrapped the alltoall again"


def test_refuses_other_megatron_version(monkeypatch):
    import megatron.core

    monkeypatch.setattr(megatron.core, "__version__", "0.15.0")
    with pytest.raises(RuntimeError, match="pinned to megatron-core==0.16.1"):
        cpu_compat.check_megatron_version()


def test_unknown_patch_name_is_rejected():
    with pytest.raises(ValueError, match="unknown CPU patch 'nope'"):
        cpu_compat.apply_cpu_patches(names=("nope",))


def _uneven_gather(rank: int, _scratch: str) -> dict:
    """Rank r holds ``sizes[r]`` rows of ``r + 1``: megatron's uneven gather before and after the patch."""
    import torch.distributed as dist
    from megatron.core.tensor_parallel import mappings

    sizes = [3, 5]
    rows = torch.full((sizes[rank], 2), float(rank + 1))
    cpu_compat.apply_cpu_patches(tuple(name for name in cpu_compat.CPU_PATCHES if name not in TWO_RANK_PATCHES))
    try:
        unpatched = mappings._gather_along_first_dim(rows, dist.group.WORLD, sizes)
    except RuntimeError as error:
        unpatched = str(error)
    cpu_compat.apply_cpu_patches(tuple(TWO_RANK_PATCHES))
    return dict(unpatched=unpatched, patched=mappings._gather_along_first_dim(rows, dist.group.WORLD, sizes))


@pytest.mark.distributed
@pytest.mark.xdist_group("dist")
def test_uneven_sequence_parallel_gather_needs_the_patch_and_gives_each_ranks_rows_in_order():
    from dist_support import spawn_world

    result = spawn_world(_uneven_gather, nprocs=2)
    assert isinstance(result["unpatched"], str) and "invalid tensor size" in result["unpatched"], result["unpatched"]
    assert torch.equal(result["patched"], torch.cat([torch.full((3, 2), 1.0), torch.full((5, 2), 2.0)]))
