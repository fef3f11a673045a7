"""Sequence parallelism (LASP-2 / LASP-2H) on gloo: SP=2 and SP=4 against SP=1 and the naive recurrence.

One spawn per SP size runs every case (spawning costs seconds on a 2-core box); rank 0 saves the
relative errors and each parametrised test checks its own case. References:

* SP=1: the full-sequence core (``gla`` / ``delta_rule`` with ``backend="chunk"``, masked softmax);
* naive: this file's token-by-token recurrences and dense attention, run on the whole sequence.

Outputs are compared slice by slice; input gradients are gathered from all ranks and compared whole;
gradients of replicated inputs (initial_state) are summed over ranks.
"""
from __future__ import annotations

import zlib

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from dist_support import spawn_world
from linear_moe.kernels.testing import rel_error
from linear_moe.model.parallel import SequenceParallelContext, count_collectives, lasp2_attention

TOL = 1e-4
B, H, K, V = 2, 2, 8, 8
T_GLOBAL = 32
PACKED_T = 48
PACKED_CU = [0, 5, 30, 31, 36, 48]  # with SP=4 (12 per rank): starts inside, exactly at and across ranks
CHUNK = 8


# ---------------------------------------------------------------------------------- naive references
def naive_linear(q, k, v, *, g=None, beta=None, u=None, scale, s0=None, cu=None):
    """Token loop: decay ``S <- diag(exp g) S + k^T v``, or (beta given) the gated delta rule.

    Returns o (B, T, H, V) and the final state (B, H, K, V); with ``cu`` the state resets at each
    document start.
    """
    Bq, T, Hq, Kq = q.shape
    S = q.new_zeros(Bq, Hq, Kq, v.shape[-1]) if s0 is None else s0.clone()
    starts = set(cu[:-1]) if cu is not None else set()
    eye = torch.eye(Kq)
    outs = []
    for t in range(T):
        if t in starts:
            S = torch.zeros_like(S)
        kt, vt, qt = k[:, t], v[:, t], q[:, t] * scale
        kv = kt[..., :, None] * vt[..., None, :]
        if beta is not None:
            decay = 1.0 if g is None else g[:, t].exp()[..., None, None]
            b = beta[:, t][..., None, None]
            S = decay * ((eye - b * kt[..., :, None] * kt[..., None, :]) @ S) + b * kv
            outs.append(torch.einsum("bhk,bhkv->bhv", qt, S))
            continue
        read = None if u is None else S + u[:, :, None] * kv
        if g is not None:
            decay = g[:, t].exp()
            S = (decay[..., None, None] if decay.ndim == 2 else decay[..., None]) * S
        S = S + kv
        outs.append(torch.einsum("bhk,bhkv->bhv", qt, S if read is None else read))
    return torch.stack(outs, 1), S


def naive_attention(q, k, v, *, scale, cu=None):
    T = q.shape[1]
    rep = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    scores = torch.einsum("bthd,bshd->bhts", q, k) * scale
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    if cu is not None:
        doc = torch.repeat_interleave(torch.arange(len(cu) - 1), torch.tensor(cu).diff())
        mask &= doc[:, None] == doc[None, :]
    return torch.einsum("bhts,bshd->bthd", scores.masked_fill(~mask, float("-inf")).softmax(-1), v)


# ---------------------------------------------------------------------------------- cases
def _inputs(name, batch, T):
    """Leaf tensors of a case (same on every rank: seeded)."""
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    rnd = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    x = {"q": rnd(batch, T, H, K), "k": rnd(batch, T, H, K), "v": rnd(batch, T, H, V)}
    return x, rnd


def _case(name):
    """(inputs dict, run(inputs, sp_context, cu) -> (o, S_final or None), naive(inputs, cu), packed cu)."""
    packed = name.endswith("_packed")
    family = name.removesuffix("_packed")
    batch, T = (1, PACKED_T) if packed else (B, T_GLOBAL)
    cu = PACKED_CU if packed else None
    x, rnd = _inputs(name, batch, T)
    scale = K ** -0.5
    if not packed and family != "attention":
        x["s0"] = rnd(batch, H, K, V) * 0.5
    if family == "attention":
        x["k"], x["v"] = rnd(batch, T, 1, K), rnd(batch, T, 1, V)  # GQA: one kv head for two query heads
    elif family == "fixed_decay":
        x["gamma_raw"] = torch.tensor([0.5, 2.0])
    elif family == "scalar_decay":
        x["g_raw"] = rnd(batch, T, H) + 2
    elif family in ("diagonal_decay", "rwkv6"):
        x["g_raw"] = rnd(batch, T, H, K) + 2
        if family == "rwkv6":
            x["u"] = rnd(H, K) * 0.5
    elif family in ("delta_rule", "gated_delta_rule"):
        x["beta_raw"] = rnd(batch, T, H)
        if family == "gated_delta_rule":
            x["g_raw"] = rnd(batch, T, H) + 2

    def derived(x):
        d = {"q": x["q"], "k": x["k"], "v": x["v"], "g": None, "beta": None, "u": x.get("u")}
        if "gamma_raw" in x:
            d["g"] = F.logsigmoid(x["gamma_raw"]).expand(x["q"].shape[0], x["q"].shape[1], H)
        elif "g_raw" in x:
            d["g"] = F.logsigmoid(x["g_raw"])
        if "beta_raw" in x:
            d["beta"] = x["beta_raw"].sigmoid()
            d["k"] = F.normalize(x["k"], dim=-1)
        return d

    def run(x, ctx, cu_t):
        d = derived(x)
        sl = slice(None) if ctx.group is None else ctx.local_slice(d["q"].shape[1])
        loc = {n: (t[:, sl] if t is not None and t.ndim >= 3 else t) for n, t in d.items()}
        state = dict(initial_state=x.get("s0"), output_final_state="s0" in x, cu_seqlens=cu_t,
                     backend="chunk", chunk_size=CHUNK)
        if family == "attention":
            return lasp2_attention(loc["q"], loc["k"], loc["v"], group=ctx.group, scale=scale, cu_seqlens=cu_t), None
        if loc["beta"] is not None:
            return ctx.delta_rule(loc["q"], loc["k"], loc["v"], loc["beta"], loc["g"], scale=scale, **state)
        return ctx.gla(loc["q"], loc["k"], loc["v"], loc["g"], u=loc["u"], scale=scale, **state)

    def naive(x):
        d = derived(x)
        if family == "attention":
            return naive_attention(d["q"], d["k"], d["v"], scale=scale, cu=cu), None
        o, S = naive_linear(d["q"], d["k"], d["v"], g=d["g"], beta=d["beta"], u=d["u"], scale=scale,
                            s0=x.get("s0"), cu=cu)
        return o, (S if "s0" in x else None)

    return x, run, naive, cu


FAMILIES = ["identity", "fixed_decay", "scalar_decay", "diagonal_decay", "rwkv6", "delta_rule",
            "gated_delta_rule", "attention"]
PACKED = ["diagonal_decay_packed", "scalar_decay_packed", "gated_delta_rule_packed", "attention_packed"]
CASES = FAMILIES + PACKED


def _loss(o, S, weights):
    loss = (o * weights["o"][: o.shape[0], : o.shape[1]]).sum()
    return loss if S is None else loss + (S * weights["S"]).sum()


def _grads(x, o, S, weights):
    leaves = {n: t for n, t in x.items() if t.requires_grad}
    grads = torch.autograd.grad(_loss(o, S, weights), list(leaves.values()), allow_unused=True)
    return {n: torch.zeros_like(leaves[n]) if g_ is None else g_ for n, g_ in zip(leaves, grads)}


def _run_case(name, ctx):
    x, run, naive, cu = _case(name)
    x = {n: t.clone().requires_grad_() for n, t in x.items()}
    T = x["q"].shape[1]
    gen = torch.Generator().manual_seed(7)
    weights = {"o": torch.randn(B, T, H, V, generator=gen), "S": torch.randn(x["q"].shape[0], H, K, V, generator=gen)}
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.long)
    sl = ctx.local_slice(T)
    # SP=N on the local chunk
    o_loc, S_sp = run(x, ctx, cu_t)
    # S_final is replicated: only rank 0 puts it in its share of the loss, so the shares sum to the loss
    g_sp = _grads(x, o_loc, S_sp if ctx.rank == 0 else None, {"o": weights["o"][:, sl], "S": weights["S"]})
    # SP=1 and naive on the whole sequence (every rank, cheap at these sizes)
    o_1, S_1 = run(x, SequenceParallelContext(), cu_t)
    g_1 = _grads(x, o_1, S_1, weights)
    o_n, S_n = naive(x)
    g_n = _grads(x, o_n, S_n, weights)
    errors = {}
    o_all = torch.cat(list(_gather(o_loc.detach(), ctx)), dim=1)
    for ref_name, o_ref, S_ref, g_ref in (("sp1", o_1, S_1, g_1), ("naive", o_n, S_n, g_n)):
        errors[f"o_vs_{ref_name}"] = rel_error(o_ref, o_all)
        if S_ref is not None:
            errors[f"S_final_vs_{ref_name}"] = rel_error(S_ref, S_sp)
        for n, g_ref_n in g_ref.items():
            # every rank's gradient covers the whole leaf (zeros outside its chunk): sum over ranks
            g_total = _gather(g_sp[n], ctx).sum(0)
            errors[f"d{n}_vs_{ref_name}"] = rel_error(g_ref_n, g_total)
    return errors


def _gather(t, ctx):
    parts = [torch.empty_like(t) for _ in range(ctx.size)]
    dist.all_gather(parts, t.contiguous(), group=ctx.group)
    return torch.stack(parts)


def _comm_volume(ctx):
    """Bytes gathered per layer, forward and backward, at two sequence lengths (diagonal GLA)."""
    out = {}
    for t_local in (8, 16):
        q, k, v = (torch.randn(B, t_local, H, d, requires_grad=True) for d in (K, K, V))
        g = F.logsigmoid(torch.randn(B, t_local, H, K) + 2).requires_grad_()
        with count_collectives() as fwd:
            o, _ = ctx.gla(q, k, v, g, backend="chunk", chunk_size=CHUNK)
        with count_collectives() as bwd:
            o.sum().backward()
        out[t_local] = {"fwd_bytes": fwd.total(), "fwd_calls": len(fwd.records),
                        "bwd_bytes": bwd.total(), "bwd_calls": len(bwd.records)}
    return out


def _worker(rank, scratch_dir):
    ctx = SequenceParallelContext(dist.group.WORLD, lasp_backend="torch")
    return {"cases": {name: _run_case(name, ctx) for name in CASES}, "comm": _comm_volume(ctx)}


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"SP{w}")
def sp_results(request):
    return request.param, spawn_world(_worker, nprocs=request.param)


@pytest.mark.distributed
@pytest.mark.xdist_group("dist")
@pytest.mark.parametrize("case", CASES)
def test_sp_matches_sp1_and_naive_outputs_and_grads(sp_results, case):
    world, results = sp_results
    errors = results["cases"][case]
    assert any(n.startswith("dq") for n in errors), "no gradients were compared"
    bad = {n: e for n, e in errors.items() if not e <= TOL}
    assert not bad, f"SP={world} {case}: relative errors above {TOL}: {bad}"


@pytest.mark.distributed
@pytest.mark.xdist_group("dist")
def test_comm_volume_equals_state_size_at_two_lengths(sp_results):
    world, results = sp_results
    fp32 = 4
    fwd_expected = B * H * (K * V + K) * fp32 * world  # (a_r, b_r): cumulative decays + final state
    bwd_expected = B * H * K * V * fp32 * world  # incoming-state gradients
    for t_local, measured in results["comm"].items():
        assert measured == {"fwd_bytes": fwd_expected, "fwd_calls": 1, "bwd_bytes": bwd_expected, "bwd_calls": 1}, (
            f"SP={world} T_local={t_local}")
