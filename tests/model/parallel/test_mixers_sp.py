"""Every mixer under sequence parallelism (gloo) against the single-process full-sequence run.

Each rank runs the mixer on its contiguous chunk inside ``use_sequence_parallel``; the reference is
the same mixer (same parameters) on the whole sequence in one process. Compared: the rank's output
slice, its input-gradient slice, and every parameter gradient summed over the ranks. The packed
case has documents that start inside a chunk, cross rank boundaries (with a document start less
than ``conv_size - 1`` tokens before a boundary, so the halo is partly masked) and one that starts
exactly at a boundary.

One spawn per SP size runs every case; rank 0 saves the worst relative error over ranks.
"""
from __future__ import annotations


import pytest
import torch
import torch.distributed as dist

from dist_support import spawn_world
from linear_moe.kernels.testing import rel_error
from linear_moe.model.config import preset
from linear_moe.model.mixers import MIXERS
from linear_moe.model.parallel import SequenceParallelContext, use_sequence_parallel

TOL = 1e-4
D = 64
BATCH, T_GLOBAL = 2, 32
PACKED_T = 48
# SP=2 (24 per rank): the boundary at 24 cuts [22, 30) two tokens after its start (halo partly
# masked). SP=4 (12 per rank): 12 inside [5, 22), 24 inside [22, 30), 36 exactly at a document start.
PACKED_CU = [0, 5, 22, 30, 31, 36, 48]
CASES = ("batch", "packed")
#: test name -> (registered mixer, config overrides); a conv wider than a chunk (T_local = 8 < 9) needs
#: its halo from two earlier ranks
VARIANTS = {"gla_conv10": ("gla", {"conv_size": 10})}
SP2_MIXERS = sorted(MIXERS)
# diagonal decay, delta rule, token shift, DPLR (matrix transition) with the value residual
SP4_MIXERS = ["gla", "gated_deltanet", "rwkv6", "rwkv7", "gla_conv10"]


def build_mixer(name: str):
    registered, overrides = VARIANTS.get(name, (name, {}))
    lsm = registered if registered != "attention" else "gla"
    config = preset("tiny", lsm_mixer=lsm, lsm_backend="chunk", **overrides)
    torch.manual_seed(1)
    mixer = MIXERS[registered](config, layer_idx=0)
    with torch.no_grad():  # move off initialisations that hide terms (unit norms, tiny dt)
        for p_name, p in mixer.named_parameters():
            if "norm" in p_name or "mix" in p_name or "dt_bias" in p_name:
                p.add_(0.1 * torch.randn_like(p))
    return mixer


def _inputs(case: str):
    gen = torch.Generator().manual_seed(3)
    B, T = (1, PACKED_T) if case == "packed" else (BATCH, T_GLOBAL)
    x = torch.randn(B, T, D, generator=gen)
    w = torch.randn(B, T, D, generator=gen)  # loss weights: loss = sum(y * w)
    cu = torch.tensor(PACKED_CU) if case == "packed" else None
    return x, w, cu


def _forward_backward(mixer, x, w, cu):
    mixer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    y, _ = mixer(x, cu_seqlens=cu)
    (y * w).sum().backward()
    grads = {n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in mixer.named_parameters()}
    return y.detach(), x.grad, grads


def _run_case(name: str, case: str, ctx: SequenceParallelContext) -> dict[str, float]:
    mixer = build_mixer(name)
    x, w, cu = _inputs(case)
    y_ref, dx_ref, g_ref = _forward_backward(mixer, x, w, cu)  # single process, whole sequence
    sl = ctx.local_slice(x.shape[1])
    with use_sequence_parallel(ctx):
        y_loc, dx_loc, g_loc = _forward_backward(mixer, x[:, sl], w[:, sl], cu)
    errors = {"y": rel_error(y_ref[:, sl], y_loc), "dx": rel_error(dx_ref[:, sl], dx_loc)}
    for n, g in g_loc.items():
        dist.all_reduce(g, group=ctx.group)
        errors[f"d{n}"] = rel_error(g_ref[n], g)
    worst = torch.tensor(list(errors.values()), dtype=torch.float64)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=ctx.group)  # the worst rank decides
    return dict(zip(errors, worst.tolist()))


def _decoding_state_rejected(names: list[str], ctx: SequenceParallelContext) -> dict[str, bool]:
    """Per mixer: does asking for a decoding state under SP raise ValueError (before any collective)?"""
    x, _, _ = _inputs("batch")
    rejected = {}
    for name in names:
        mixer = build_mixer(name)
        try:
            with use_sequence_parallel(ctx):
                mixer(x[:, ctx.local_slice(x.shape[1])], output_state=True)
            rejected[name] = False
        except ValueError:
            rejected[name] = True
    return rejected


def _worker(rank, scratch_dir, names):
    ctx = SequenceParallelContext(dist.group.WORLD, lasp_backend="torch")
    results = {}
    for name in names:
        for case in CASES:
            try:
                results[f"{name}/{case}"] = _run_case(name, case, ctx)
            except Exception as exc:  # report per case; every rank raises alike (same shapes)
                results[f"{name}/{case}"] = {"error": f"{type(exc).__name__}: {exc}"}
    results["decoding_state_rejected"] = _decoding_state_rejected(names, ctx)
    return results


@pytest.fixture(scope="module")
def sp2_results():
    return spawn_world(_worker, args=(SP2_MIXERS,), nprocs=2)


@pytest.fixture(scope="module")
def sp4_results():
    return spawn_world(_worker, args=(SP4_MIXERS,), nprocs=4)


def _check(results: dict, world: int, name: str, case: str) -> None:
    errors = results[f"{name}/{case}"]
    assert "error" not in errors, f"SP={world} {name}/{case} raised {errors.get('error')}"
    assert any(n.startswith("d") and n != "dx" for n in errors), "no parameter gradients were compared"
    bad = {n: e for n, e in errors.items() if not e <= TOL}
    assert not bad, f"SP={world} {name}/{case}: relative errors above {TOL}: {bad}"


@pytest.mark.distributed
@pytest.mark.xdist_group("dist")
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", SP2_MIXERS)
def test_sp2_matches_single_process_outputs_and_grads(sp2_results, name, case):
    _check(sp2_results, 2, name, case)


@pytest.mark.distributed
@pytest.mark.xdist_group("dist")
def test_decoding_state_under_sp_is_rejected(sp2_results):
    accepted = [name for name, rejected in sp2_results["decoding_state_rejected"].items() if not rejected]
    assert not accepted, f"mixers that returned a per-chunk decoding state under SP: {accepted}"


@pytest.mark.distributed
@pytest.mark.xdist_group("dist")
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", SP4_MIXERS)
def test_sp4_matches_single_process_outputs_and_grads(sp4_results, name, case):
    _check(sp4_results, 4, name, case)
