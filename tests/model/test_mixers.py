"""Sequence mixers against independent references.

Every LSM mixer: chunked backend vs the naive recurrence (outputs, final state and every gradient),
segment continuation from a state, packed documents vs separate runs, one-token decoding vs the full
forward.  Softmax attention against an explicit dense softmax.  Architecture checks against fla's
pure-PyTorch references or explicit parallel forms where the math is identical.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from linear_moe.kernels.testing import assert_rel_close
from linear_moe.model.config import preset
from linear_moe.model.mixers import MIXERS
from linear_moe.model.mixers.common import GatedRMSNorm, merge_heads, split_heads, token_shift
from linear_moe.model.mixers.short_conv import ShortConvolution

LSM_MIXERS = [
    "linear_attention", "lightning", "retention", "gla", "gsa", "based", "rebased", "hgrn2", "rwkv6",
    "mamba2", "mom_gla", "mom_gated_deltanet",
]
ALL_MIXERS = LSM_MIXERS + ["attention"]
B, T, D = 2, 37, 64  # T is not a multiple of the chunk size 16
CU_SEQLENS = [0, 5, 22, 37]
RATIO = 1e-4
# ReBased's normaliser phi(q).z sums d(d+1)/2 mixed-sign products into (y_q.y_k)^2/d, which is
# near 0 for some tokens: fp32 cancellation there is inherent (measured ~1e-5 forward, ~1e-3 grads
# for either backend against a float64 quadratic form), so its chunk-vs-naive ratio is looser.
CHUNK_RATIO = {"rebased": 3e-3}


def make_mixer(name: str, **overrides):
    lsm = name if name != "attention" else "gla"
    config = preset("tiny", lsm_mixer=lsm, chunk_size=16, **overrides)
    torch.manual_seed(1)
    mixer = MIXERS[name](config, layer_idx=0)
    with torch.no_grad():  # move off initialisations that would hide a term of the recurrence
        if hasattr(mixer, "dt_bias"):
            mixer.dt_bias.zero_()  # dt ~ 0.7 instead of ~0.01: the state matters next to the skip
        for p_name, p in mixer.named_parameters():
            if "norm" in p_name or "mix_bias" in p_name or "mu_x" in p_name:
                p.add_(0.1 * torch.randn_like(p))
    return mixer


def run(mixer, x, backend="chunk", **kwargs):
    mixer.backend = backend
    return mixer(x, **kwargs)


def assert_states_close(name, ref: dict, actual: dict, ratio=RATIO):
    assert set(ref) == set(actual), f"{name}: state keys {sorted(actual)} != {sorted(ref)}"
    for key in ref:
        if ref[key].is_floating_point():
            assert_rel_close(f"{name} state[{key}]", ref[key], actual[key], ratio)
        else:
            assert torch.equal(ref[key], actual[key]), f"{name} state[{key}]"


# ---------------------------------------------------------------------- LSM mixers
@pytest.mark.parametrize("name", LSM_MIXERS)
def test_chunk_matches_naive(name):
    mixer = make_mixer(name)
    x = torch.randn(B, T, D)
    w = torch.randn(B, T, D)
    results = {}
    for backend in ("naive", "chunk"):
        mixer.zero_grad()
        xb = x.clone().requires_grad_()
        y, state = run(mixer, xb, backend, output_state=True)
        ((y * w).sum() + state["S"].pow(2).sum()).backward()
        grads = {n: p.grad.clone() for n, p in mixer.named_parameters() if p.grad is not None}
        results[backend] = (y.detach(), state, xb.grad, grads)
    (y0, s0, dx0, g0), (y1, s1, dx1, g1) = results["naive"], results["chunk"]
    ratio = CHUNK_RATIO.get(name, RATIO)
    assert_rel_close(f"{name} y", y0, y1, ratio)
    assert_states_close(name, {k: v.detach() for k, v in s0.items()}, {k: v.detach() for k, v in s1.items()}, ratio)
    assert_rel_close(f"{name} dx", dx0, dx1, ratio)
    params = [n for n, p in mixer.named_parameters() if p.requires_grad]
    assert sorted(g0) == sorted(params), f"{name}: parameters without a gradient: {set(params) - set(g0)}"
    for n in params:
        assert_rel_close(f"{name} d{n}", g0[n], g1[n], ratio)


@pytest.mark.parametrize("name", ALL_MIXERS)
def test_initial_state_matches_concatenation(name):
    mixer = make_mixer(name)
    x = torch.randn(B, T, D)
    with torch.no_grad():
        y_full, s_full = run(mixer, x, output_state=True)
        y1, s1 = run(mixer, x[:, :21], output_state=True)
        y2, s2 = run(mixer, x[:, 21:], state=s1, output_state=True)
    assert_rel_close(f"{name} y", y_full, torch.cat([y1, y2], 1), RATIO)
    assert_states_close(name, s_full, s2)


@pytest.mark.parametrize("name", ALL_MIXERS)
def test_varlen_matches_separate_runs(name):
    mixer = make_mixer(name)
    x = torch.randn(1, T, D)
    cu = torch.tensor(CU_SEQLENS)
    with_state = name != "attention"  # a KV cache has one length per row: not packed
    with torch.no_grad():
        y_packed, s_packed = run(mixer, x, cu_seqlens=cu, output_state=with_state)
        for n in range(len(CU_SEQLENS) - 1):
            y_n, s_n = run(mixer, x[:, cu[n]:cu[n + 1]], output_state=with_state)
            assert_rel_close(f"{name} y[doc {n}]", y_n, y_packed[:, cu[n]:cu[n + 1]], RATIO)
            if with_state:
                assert_states_close(f"{name} doc {n}", s_n, {k: v[n:n + 1] for k, v in s_packed.items()})


@pytest.mark.parametrize("name", LSM_MIXERS)
def test_varlen_from_states_matches_separate_runs(name):
    """Packed documents each continuing its own earlier segment (state rows = documents)."""
    mixer = make_mixer(name)
    prefix = torch.randn(3, 6, D)
    x = torch.randn(1, T, D)
    cu = torch.tensor(CU_SEQLENS)
    with torch.no_grad():
        _, s0 = run(mixer, prefix, output_state=True)
        y_packed, s_packed = run(mixer, x, state=s0, cu_seqlens=cu, output_state=True)
        for n in range(3):
            s0_n = {k: v[n:n + 1] for k, v in s0.items()}
            y_n, s_n = run(mixer, x[:, cu[n]:cu[n + 1]], state=s0_n, output_state=True)
            assert_rel_close(f"{name} y[doc {n}]", y_n, y_packed[:, cu[n]:cu[n + 1]], RATIO)
            assert_states_close(f"{name} doc {n}", s_n, {k: v[n:n + 1] for k, v in s_packed.items()})


@pytest.mark.parametrize("name", ALL_MIXERS)
def test_decoding_matches_full_forward(name):
    mixer = make_mixer(name)
    x = torch.randn(B, 24, D)
    with torch.no_grad():
        y_full, s_full = run(mixer, x, output_state=True)
        y, state = run(mixer, x[:, :17], output_state=True)
        outputs = [y]
        for t in range(17, 24):
            y_t, state = run(mixer, x[:, t:t + 1], state=state, output_state=True)
            outputs.append(y_t)
    assert_rel_close(f"{name} y", y_full, torch.cat(outputs, 1), RATIO)
    assert_states_close(name, s_full, state)


# ---------------------------------------------------------------------- softmax attention
def rope_reference(x_BTHd, pos_T, theta):
    """Rotary embedding as complex multiplication of (x_i, x_{i+d/2}) pairs."""
    d = x_BTHd.shape[-1]
    freqs = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    rot = torch.polar(torch.ones(len(pos_T), d // 2, dtype=torch.float64), pos_T[:, None].double() * freqs)
    z = torch.complex(x_BTHd[..., : d // 2].double(), x_BTHd[..., d // 2:].double()) * rot[None, :, None]
    return torch.cat([z.real, z.imag], dim=-1)


def dense_attention(mixer, x_1TD, doc_T):
    """softmax(q k^T / sqrt(d) + mask) v written out, positions restarting per document."""
    H, Hkv, d = mixer.num_heads, mixer.num_kv_heads, mixer.head_dim
    pos = torch.cat([torch.arange(int((doc_T == n).sum())) for n in doc_T.unique()])
    q = rope_reference(split_heads(mixer.q_proj(x_1TD), H), pos, mixer.config.rope_theta)
    k = rope_reference(split_heads(mixer.k_proj(x_1TD), Hkv), pos, mixer.config.rope_theta)
    v = split_heads(mixer.v_proj(x_1TD), Hkv).double()
    k, v = (t.repeat_interleave(H // Hkv, dim=2) for t in (k, v))
    scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(d)
    i = torch.arange(x_1TD.shape[1])
    allowed = (i[:, None] >= i[None, :]) & (doc_T[:, None] == doc_T[None, :])
    scores = scores.masked_fill(~allowed, float("-inf"))
    o = torch.einsum("bhij,bjhd->bihd", scores.softmax(-1), v)
    return mixer.o_proj(merge_heads(o).float())


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1], ids=["MHA", "GQA2", "MQA"])
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "varlen"])
def test_attention_matches_dense_softmax(num_kv_heads, packed):
    mixer = make_mixer("attention", num_kv_heads=num_kv_heads)
    x = torch.randn(1, T, D)
    cu = torch.tensor(CU_SEQLENS) if packed else None
    doc = torch.repeat_interleave(torch.arange(3), torch.diff(cu)) if packed else torch.zeros(T, dtype=torch.long)
    with torch.no_grad():
        y, _ = mixer(x, cu_seqlens=cu)
        assert_rel_close("attention y", dense_attention(mixer, x, doc), y, 1e-5)


def test_attention_cache_rejects_cu_seqlens():
    mixer = make_mixer("attention")
    with pytest.raises(ValueError, match="cu_seqlens"):
        mixer(torch.randn(1, 8, D), cu_seqlens=torch.tensor([0, 3, 8]), output_state=True)


# ---------------------------------------------------------------------- config validation
@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(lsm_mixer="linear_attention", feature_map="cosine"), "feature_map"),
        (dict(lsm_mixer="mamba2", state_size=0), "state_size"),
        (dict(lsm_mixer="gsa", num_slots=0), "num_slots"),
        (dict(lsm_mixer="retention", expand_k=0.5625), "expand_k"),  # key_dim 9: odd, no RoPE
    ],
    ids=["feature_map", "state_size", "num_slots", "odd_rope_dim"],
)
def test_validate_config_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        preset("tiny", **overrides)


def test_attention_validate_config_rejects_odd_head_dim():
    config = preset("tiny", hidden_size=60, num_heads=4)  # head_dim 15
    with pytest.raises(ValueError, match="head_dim"):
        MIXERS["attention"].validate_config(config)


# ---------------------------------------------------------------------- building blocks
def test_short_conv_matches_loop_with_caches_and_documents():
    conv = ShortConvolution(6, 4)
    x = torch.randn(1, 11, 6)
    cache = torch.randn(3, 6, 3)
    cu = torch.tensor([0, 2, 7, 11])
    y, new_cache = conv(x, cache, cu, output_cache=True)
    for n in range(3):
        hist = torch.cat([cache[n].T, x[0, cu[n]:cu[n + 1]]])  # (3 + L, C), oldest first
        ref = torch.stack([F.silu((hist[t:t + 4] * conv.weight.T).sum(0)) for t in range(len(hist) - 3)])
        assert_rel_close(f"conv y[doc {n}]", ref, y[0, cu[n]:cu[n + 1]], 1e-6)
        assert_rel_close(f"conv cache[doc {n}]", hist[-3:].T, new_cache[n], 0)


def test_token_shift_matches_loop():
    x = torch.randn(1, 9, 5)
    last = torch.randn(2, 5)
    prev, new_last = token_shift(x, last, torch.tensor([0, 4, 9]))
    ref = torch.stack([last[0], *x[0, 0:3], last[1], *x[0, 4:8]])
    assert torch.equal(prev[0], ref) and torch.equal(new_last, x[0, [3, 8]])


def test_gated_rmsnorm_matches_formula():
    norm = GatedRMSNorm(8, eps=1e-6)
    torch.nn.init.normal_(norm.weight)
    x, gate = torch.randn(3, 8), torch.randn(3, 8)
    ref = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight * gate * torch.sigmoid(gate)
    assert_rel_close("gated rmsnorm", ref, norm(x, gate), 1e-6)


# ---------------------------------------------------------------------- architectures vs references
def test_gsa_matches_fla_naive_recurrent_gsa():
    from fla.ops.gsa.naive import naive_recurrent_gsa

    mixer = make_mixer("gsa")
    x = torch.randn(B, T, D)
    H = mixer.num_heads
    with torch.no_grad():
        q, k, v = (split_heads(p(x, "", None, None), H) for p in (mixer.q_proj, mixer.k_proj, mixer.v_proj))
        f = F.logsigmoid(split_heads(mixer.f_proj(x), H)) / 8
        o, _ = naive_recurrent_gsa(q, k, F.silu(v) if mixer.v_proj.conv is None else v, 1 - f.exp(), f, scale=1.0)
        ref = mixer.o_proj(merge_heads(mixer.norm(F.silu(o))))
        assert_rel_close("gsa y", ref, mixer(x)[0], RATIO)


def test_rwkv6_core_matches_fla_naive_recurrent_rwkv6():
    from fla.ops.rwkv6.recurrent_naive import naive_recurrent_rwkv6

    from linear_moe.kernels.gla import gla

    mixer = make_mixer("rwkv6")
    H, K = 4, 16
    r, k, v = (torch.randn(B, T, H, K) for _ in range(3))
    w = -torch.exp(torch.randn(B, T, H, K) - 1)
    ref, _ = naive_recurrent_rwkv6(*(t.transpose(1, 2) for t in (r, k, v, w)), mixer.bonus.detach(), scale=1.0)
    for backend in ("naive", "chunk"):
        o, _ = gla(r, k, v, w, u=mixer.bonus.detach(), scale=1.0, backend=backend, chunk_size=16)
        assert_rel_close(f"rwkv6 core ({backend})", ref.transpose(1, 2), o, RATIO)


def test_retention_matches_fla_parallel_retention():
    from fla.ops.retention.naive import naive_retention

    from linear_moe.model.mixers.common import apply_rope

    mixer = make_mixer("retention")
    x = torch.randn(B, T, D)
    H = mixer.num_heads
    pos = torch.arange(T).expand(B, T)
    with torch.no_grad():
        q = apply_rope(split_heads(mixer.q_proj(x), H), pos, mixer.config.rope_theta)
        k = apply_rope(split_heads(mixer.k_proj(x), H), pos, mixer.config.rope_theta)
        v = split_heads(mixer.v_proj(x), H)
        o = naive_retention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
        ref = mixer.o_proj(merge_heads(mixer.norm(o, split_heads(mixer.g_proj(x), H))))
        assert_rel_close("retention y", ref, mixer(x)[0], RATIO)


@pytest.mark.parametrize("name", ["based", "rebased"])
def test_based_family_matches_quadratic_attention(name):
    """phi(q).phi(k) is 1 + s + s^2/2 with s = q.k/sqrt(d) (Based) or (y_q.y_k)^2/d (ReBased)."""
    mixer = make_mixer(name)
    x = torch.randn(B, T, D)
    H, d = mixer.num_heads, mixer.feature_dim
    with torch.no_grad():
        q, k = split_heads(mixer.q_proj(x), H), split_heads(mixer.k_proj(x), H)
        if name == "based":
            s = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(d)
            a = 1 + s + s * s / 2
        else:
            fm = mixer.feature_map
            yq, yk = (F.layer_norm(t, (d,), eps=fm.eps) * fm.gamma + fm.beta for t in (q, k))
            a = torch.einsum("bihd,bjhd->bhij", yq, yk).pow(2) / d
        a = a * torch.tril(torch.ones(T, T))
        v = split_heads(mixer.v_proj(x), H)
        o = torch.einsum("bhij,bjhd->bihd", a, v) / (a.sum(-1).transpose(1, 2).unsqueeze(-1) + 1e-5)
        assert_rel_close(f"{name} y", mixer.o_proj(merge_heads(o)), mixer(x)[0], RATIO)


def test_mamba2_matches_ssm_recurrence():
    mixer = make_mixer("mamba2")
    x = torch.randn(B, T, D)
    H = mixer.num_heads
    with torch.no_grad():
        xs = split_heads(mixer.x_proj(x, "", None, None), H)  # (B, T, H, P)
        Bm, Cm = mixer.B_proj(x, "", None, None), mixer.C_proj(x, "", None, None)  # (B, T, N)
        dt = F.softplus(mixer.dt_proj(x) + mixer.dt_bias)  # (B, T, H)
        A = -torch.exp(mixer.A_log)
        h = torch.zeros(B, H, xs.shape[-1], Bm.shape[-1])  # (B, H, P, N), Mamba's layout
        ys = []
        for t in range(T):
            h = torch.exp(dt[:, t, :, None, None] * A[:, None, None]) * h \
                + dt[:, t, :, None, None] * xs[:, t, :, :, None] * Bm[:, t, None, None, :]
            ys.append(torch.einsum("bhpn,bn->bhp", h, Cm[:, t]) + mixer.D[:, None] * xs[:, t])
        y = torch.stack(ys, 1)
        z = split_heads(mixer.z_proj(x), H)
        ref = mixer.o_proj(merge_heads(mixer.norm(y * F.silu(z))))
        assert_rel_close("mamba2 y", ref, mixer(x)[0], RATIO)


def _mom_subsequence_reference(mixer, x, core):
    """Each memory run over only the tokens routed to it (plus the shared memory over all tokens)."""
    from linear_moe.model.mixers.mom import route

    H, M = mixer.num_heads, mixer.num_memories
    weights, mask = route(mixer.router(x), mixer.top_k)
    q = split_heads(mixer.q_proj(x, "", None, None), H)
    k = split_heads(mixer.k_proj(x, "", None, None), (M + 1) * H).unflatten(2, (M + 1, H))
    v = split_heads(mixer.v_proj(x, "", None, None), (M + 1) * H).unflatten(2, (M + 1, H))
    o = torch.zeros(B, T, H, v.shape[-1])
    for b in range(B):
        for m in range(M + 1):
            idx = torch.arange(T) if m == M else mask[b, :, m].nonzero().squeeze(-1)
            w = torch.ones(T) if m == M else weights[b, :, m]
            if len(idx):
                o_m = core(x[b:b + 1, idx], q[b:b + 1, idx], k[b:b + 1, idx, m], v[b:b + 1, idx, m], m)
                o[b, idx] += w[idx, None, None] * o_m[0]
    o = mixer.norm(o, split_heads(mixer.g_proj(x), H))
    return mixer.o_proj(merge_heads(o))


def test_mom_gla_matches_per_memory_subsequences():
    from linear_moe.kernels.gla import naive_gla

    mixer = make_mixer("mom_gla", conv_size=0)
    H, K = mixer.num_heads, mixer.config.key_dim

    def core(x, q, k, v, m):
        g = F.logsigmoid(mixer.gk_up[m](mixer.gk_down(x))).unflatten(-1, (H, K)) / 16
        return naive_gla(q, k, v, g)[0]

    x = torch.randn(B, T, D)
    with torch.no_grad():
        assert_rel_close("mom_gla y", _mom_subsequence_reference(mixer, x, core), mixer(x)[0], RATIO)


def test_mom_gated_deltanet_matches_per_memory_subsequences():
    from linear_moe.kernels.delta_rule import naive_delta_rule

    mixer = make_mixer("mom_gated_deltanet", conv_size=0)

    def core(x, q, k, v, m):
        beta = torch.sigmoid(mixer.b_proj[m](x))
        g = -torch.exp(mixer.A_log) * F.softplus(mixer.a_proj[m](x) + mixer.dt_bias)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        return naive_delta_rule(q, k, v, beta, g, scale=q.shape[-1] ** -0.5)[0]

    x = torch.randn(B, T, D)
    with torch.no_grad():
        assert_rel_close("mom_gated_deltanet y", _mom_subsequence_reference(mixer, x, core), mixer(x)[0], RATIO)


@pytest.mark.parametrize("name", ["dpfp", "taylor"])
def test_feature_map_matches_fla(name):
    """Same kernel ``phi(q).phi(k)`` as fla's map (compared as Gram matrices: feature order may differ)."""
    from fla.modules import feature_map as fla_fm

    from linear_moe.model.mixers.feature_maps import FEATURE_MAPS

    x = torch.randn(2, 5, 3, 8)
    ours = FEATURE_MAPS[name](8, 3)
    theirs = fla_fm.DPFPFeatureMap(8, nu=ours.nu) if name == "dpfp" else fla_fm.TaylorFeatureMap(8)
    a, b = ours(x), theirs(x)
    assert a.shape[-1] == ours.out_dim
    gram = "...id,...jd->...ij"
    assert_rel_close(f"{name} gram", torch.einsum(gram, b, b), torch.einsum(gram, a, a), 1e-6)
