"""Whole mixers against flash-linear-attention's own layers, with the same weights.

The other mixer tests compare a mixer with itself (naive vs chunked backend, packed vs separate,
decoding vs full forward, SP vs one process); this one pins what those cannot see: that the
projections, short convs, gates, normalisations and output path compute what fla's layer of the same
name computes. fla's layers run their Triton kernels, so the comparison runs in one Triton-interpreter
process (``run_interpreted``), on tiny shapes (B=2, T=20, hidden 64, 4 heads, fp32); our mixers run
their PyTorch chunked path. fla's parameters are built from ours by the name map; its gradients are
pulled back through the map into our layout (summing repeated copies). Compared as relative RMS error:
the output, the input gradient and every parameter's gradient within 1e-5, except:

* RWKV-7 (layer 0, and a later layer with the value residual fed the same ``v_first``) within 2e-4,
  the level at which fla's DPLR kernel and our chunked DPLR form agree on their own (measured: 2e-5 on
  the output, at most 1e-4 on a gradient);
* ReBased's q/k path (input, q/k projection and feature-map gradients) within 2e-3, the rest within
  1e-5: its normaliser ``sum_i (y_q . y_k_i)^2 / d`` comes near 0 at early tokens, so the q/k-path
  gradients lose digits in fp32 (measured against our fp64 run: ours up to 2.6e-4 off, fla's
  input gradient 3.5e-4; the two 7.4e-4 apart, while the output and the v/o gradients agree to 5e-6).

Based agrees to 6e-6, all of it the normaliser's eps (ours 1e-5, fla's parallel kernel 1e-6). Where our
mixer deliberately differs, the comparison runs where the difference vanishes:

* hgrn2, gsa: ours normalise per head (no TP reduction), fla over the whole value width: compared at
  one head; norm_eps 1e-5, as fla's fused norm-linear ignores the layer's ``norm_eps``. gsa also without
  the short conv, with which fla's GSA applies silu twice (the conv's and the feature map's), ours once.
* mamba2: fla's default single group normalises the whole width: compared with ``n_groups = heads``
  (B, C repeated per group) and our one (P,) norm weight repeated per head. Without mamba_ssm and
  causal_conv1d fla runs its PyTorch path (only the gated norm is a Triton kernel).
* rebased: fla's feature map has one gamma/beta for all heads, ours one per head: ours tied to row 0.
* mom_gated_deltanet: fla runs one k and one v conv (shared by all memories) over each memory's routed
  tokens, ours one conv per memory over the whole stream: compared at conv_size 1 (per-token) with our
  per-memory convs tied. fla orders each memory's tokens with an unstable ``argsort``, which on CPU
  scrambles them (a non-causal recurrence): made stable for the comparison.

Not compared: mom_gla (fla's MoM layer has gated-delta-rule memories only); lightning (fla has no
lightning-attention layer, and its ``chunk_lightning_attn`` op decays by ``-(8/H)(1 - l/L) h``, not by the
layer-scaled ALiBi slopes ``2^(-8(h+1)/H) (1 - l/(L-1))`` that ours uses).
"""
import contextlib
import json

import pytest
import torch

from linear_moe.kernels.triton_cpu import run_interpreted

pytestmark = pytest.mark.slow

RATIO = 1e-5
RATIO_DPLR = 2e-4
RATIO_REBASED = 2e-3


def _conv(weight_CW: torch.Tensor) -> torch.Tensor:
    """Our short conv weight (C, W) as fla's ShortConvolution (nn.Conv1d) weight (C, 1, W)."""
    return weight_CW[:, None]


def _qkv_conv(prefix: str = "") -> dict:
    return {f"{p}_proj.weight": (f"{prefix}{p}_proj.proj.weight", None) for p in "qkv"} | \
        {f"{p}_conv1d.weight": (f"{prefix}{p}_proj.conv.weight", _conv) for p in "qkv"}


def _same(t):
    return t


def _names(our: str | tuple[str, ...]) -> tuple[str, ...]:
    return (our,) if isinstance(our, str) else our


def _rwkv7_names(value_residual: bool) -> dict:
    """RWKV-7: token-shift mixes (our rows r, w, k, v, a, g of ``mix_CD``), per-head k_k / k_a flattened,
    LoRAs as fla's ``lora.0`` (down) / ``lora.2`` (up, with bias)."""
    names = {f"x_{c}": ("mix_CD", lambda t, i=i: t[i].reshape(1, 1, -1)) for i, c in enumerate("rwkvag")}
    names |= {"k_k": ("k_k", lambda t: t.reshape(-1)), "k_a": ("k_a", lambda t: t.reshape(-1)),
              "r_k": ("r_k", None), "g_norm.weight": ("g_norm.weight", None), "g_norm.bias": ("g_norm.bias", None)}
    names |= {f"{p}_proj.weight": (f"{p}_proj.weight", None) for p in "rkvo"}
    for lora in ("w", "a", "g") + (("v",) if value_residual else ()):
        names[f"{lora}_lora.lora.0.weight"] = (f"{lora}_lora.down.weight", None)
        names[f"{lora}_lora.lora.2.weight"] = (f"{lora}_lora.up.weight", None)
        if lora != "g":
            names[f"{lora}_lora.lora.2.bias"] = (f"{lora}_lora.up.bias", None)
    return names


RWKV7_RANKS = dict(decay_low_rank_dim=16, a_low_rank_dim=16, gate_low_rank_dim=32, v_low_rank_dim=16,
                   num_hidden_layers=2, head_dim=16)


def _rwkv6_names() -> dict:
    """RWKV-6: the token-shift LoRA as fla's ``x_proj`` (``mu``, down, up as one (D, 5 r) weight), each
    projection's interpolation as its ``DDLerpLinear``, the per-head layer norm as fla's GroupNorm."""
    names = {"x_proj.0.mu": ("mu_x", None), "x_proj.0.linear.weight": ("mix_down.weight", None),
             "x_proj.2.weight": ("mix_up", lambda t: t.permute(2, 0, 1).flatten(1)), "x_bias": ("mix_bias", None),
             "w_proj.linear.lora.0.weight": ("w_down.weight", None), "bonus": ("bonus", None),
             "w_proj.linear.lora.2.weight": ("w_up.weight", None), "w_proj.linear.lora.2.bias": ("w_up.bias", None),
             "g_norm.weight": ("norm.weight", torch.flatten), "g_norm.bias": ("norm.bias", torch.flatten),
             "o_proj.weight": ("o_proj.weight", None)}
    return names | {f"{p}_proj.linear.weight": (f"{p}_proj.weight", None) for p in "rkvg"}


def _mamba2_names(H: int) -> dict:
    """Mamba2 with fla's ``n_groups = H`` (its norm groups are then our heads): B and C repeated per group,
    our projections and convs stacked as fla's ``in_proj`` [z, x, B, C, dt] and ``conv1d`` [x, B, C]."""
    xbc = ("x_proj.{}.weight", "B_proj.{}.weight", "C_proj.{}.weight")
    return {
        "in_proj.weight": (("z_proj.weight", *(n.format("proj") for n in xbc), "dt_proj.weight"),
                           lambda z, x, b, c, dt: torch.cat([z, x, b.repeat(H, 1), c.repeat(H, 1), dt])),
        "conv1d.weight": (tuple(n.format("conv") for n in xbc),
                          lambda x, b, c: _conv(torch.cat([x, b.repeat(H, 1), c.repeat(H, 1)]))),
        "dt_bias": ("dt_bias", None), "A_log": ("A_log", None), "D": ("D", None),
        "norm.weight": ("norm.weight", lambda t: t.repeat(H)), "out_proj.weight": ("o_proj.weight", None)}


def _mom_names(M: int) -> dict:
    """MoM: memory m's k/v/b/a projections as fla's ``{k,v,b,a}_proj.m`` (the shared memory, ours last, as
    ``shared_*``); the k and v convs of all memories as fla's one ``k_conv1d`` / ``v_conv1d`` (see _tie_mom)."""
    names = {"gate.weight": ("router.weight", None), "q_proj.weight": ("q_proj.proj.weight", None),
             "q_conv1d.weight": ("q_proj.conv.weight", _conv), "k_conv1d.weight": ("k_proj.0.conv.weight", _conv),
             "v_conv1d.weight": ("v_proj.0.conv.weight", _conv), "A_log": ("A_log", None), "dt_bias": ("dt_bias", None),
             "g_proj.weight": ("g_proj.weight", None), "o_norm.weight": ("norm.weight", None),
             "o_proj.weight": ("o_proj.weight", None)}
    for m in range(M + 1):
        names |= {(f"{p}_proj.{m}.weight" if m < M else f"shared_{p}.weight"):
                  (f"{p}_proj.{m}.proj.weight" if p in "kv" else f"{p}_proj.{m}.weight", None) for p in "kvba"}
    return names


def _tie_mom(ours) -> None:
    """One k and one v conv for every memory, as fla's layer: ours share memory 0's weights."""
    for proj in (ours.k_proj, ours.v_proj):
        for member in proj[1:]:
            member.conv.weight = proj[0].conv.weight


class _FirstRow(torch.nn.Module):
    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return t[:1].expand_as(t)


def _tie_rebased(ours) -> None:
    """fla's ReBased feature map has one gamma and beta for all heads: ours use row 0 in every head."""
    from torch.nn.utils import parametrize

    for name in ("gamma", "beta"):
        parametrize.register_parametrization(ours.feature_map, name, _FirstRow())


@contextlib.contextmanager
def _stable_argsort():
    """fla's MoM sorts tokens by memory with ``Tensor.argsort()``: keep each memory's token order."""
    argsort = torch.Tensor.argsort
    torch.Tensor.argsort = lambda t, dim=-1, descending=False: argsort(t, dim=dim, descending=descending, stable=True)
    try:
        yield
    finally:
        torch.Tensor.argsort = argsort


def _proj(*letters: str) -> dict:
    return {f"{p}_proj.weight": (f"{p}_proj.weight", None) for p in letters}


H = 4  # heads of the tiny preset
MEMORIES = 4  # ModelConfig.num_memories
FUSED_NORM = dict(norm_eps=1e-5)  # fla's GSA / HGRN2 call rms_norm_linear without their norm's eps: its 1e-5
REBASED_MAP = {f"feature_map.{p}": (f"feature_map.parametrizations.{p}.original", lambda t: t[0])
               for p in ("gamma", "beta")}

#: case -> our mixer (``config``: preset overrides; ``tie``: run on ours before the copy), fla's layer class,
#: which ``shared`` kwargs it takes (all by default) and its other ``kwargs``, our layer index, a ``context``
#: for fla's forward, and {fla parameter name: (our parameter name(s), map of ours into fla's layout)}
LAYERS = {
    "gated_deltanet": dict(mixer="gated_deltanet", fla="fla.layers.gated_deltanet.GatedDeltaNet",
                           kwargs=dict(expand_v=1.0, head_dim=16), names={
        **_qkv_conv(), "a_proj.weight": ("a_proj.weight", None), "b_proj.weight": ("b_proj.weight", None),
        "A_log": ("A_log", None), "dt_bias": ("dt_bias", None), "g_proj.weight": ("g_proj.weight", None),
        "o_norm.weight": ("norm.weight", None), "o_proj.weight": ("o_proj.weight", None)}),
    "deltanet": dict(mixer="deltanet", fla="fla.layers.delta_net.DeltaNet",
                     kwargs=dict(expand_k=1.0, expand_v=1.0, use_short_conv=True), names={
        **_qkv_conv(), "b_proj.weight": ("b_proj.weight", None), "o_norm.weight": ("norm.weight", None),
        "o_proj.weight": ("o_proj.weight", None)}),
    "gla": dict(mixer="gla", fla="fla.layers.gla.GatedLinearAttention",
                kwargs=dict(expand_k=1.0, expand_v=1.0, use_short_conv=True), names={
        **_qkv_conv(), "g_proj.weight": ("g_proj.weight", None), "gk_proj.0.weight": ("gk_down.weight", None),
        "gk_proj.1.weight": ("gk_up.weight", None), "gk_proj.1.bias": ("gk_up.bias", None),
        "g_norm_swish_gate.weight": ("norm.weight", None), "o_proj.weight": ("o_proj.weight", None)}),
    "retention": dict(mixer="retention", fla="fla.layers.multiscale_retention.MultiScaleRetention",
                      kwargs=dict(expand_k=1.0, expand_v=1.0), names={
        **{f"{p}_proj.weight": (f"{p}_proj.weight", None) for p in "qkvgo"},
        "g_norm_swish_gate.weight": ("norm.weight", None)}),
    "linear_attention": dict(mixer="linear_attention", fla="fla.layers.linear_attn.LinearAttention",
                             kwargs=dict(expand_k=1.0, expand_v=1.0, feature_map="elu", output_norm="rmsnorm"),
                             names={**{f"{p}_proj.weight": (f"{p}_proj.weight", None) for p in "qkvo"},
                                    "norm.weight": ("norm.weight", None)}),
    "rwkv7": dict(mixer="rwkv7", fla="fla.layers.rwkv7.RWKV7Attention", kwargs=RWKV7_RANKS, names=_rwkv7_names(False),
                  ratio=RATIO_DPLR),
    "rwkv7_value_residual": dict(mixer="rwkv7", fla="fla.layers.rwkv7.RWKV7Attention", kwargs=RWKV7_RANKS,
                                 layer_idx=1, names=_rwkv7_names(True), ratio=RATIO_DPLR),
    "rwkv6": dict(mixer="rwkv6", fla="fla.layers.rwkv6.RWKV6Attention", kwargs=dict(expand_k=1.0, expand_v=1.0),
                  names=_rwkv6_names()),
    "based": dict(mixer="based", fla="fla.layers.based.BasedLinearAttention", shared=("hidden_size", "num_heads"),
                  kwargs=dict(feature_dim=16, num_key_value_heads=H), names=_proj(*"qkvo")),
    "rebased": dict(mixer="rebased", fla="fla.layers.rebased.ReBasedLinearAttention", tie=_tie_rebased,
                    kwargs=dict(feature_dim=16, num_key_value_heads=H), names=_proj(*"qkvo") | REBASED_MAP,
                    loose=("dx", "dq_proj", "dk_proj", "dfeature_map"), ratio=RATIO_REBASED),
    "mamba2": dict(mixer="mamba2", fla="fla.layers.mamba2.Mamba2",
                   shared=("hidden_size", "num_heads", "norm_eps", "layer_idx"), names=_mamba2_names(H),
                   kwargs=dict(head_dim=16, state_size=16, expand=1, n_groups=H, conv_kernel=4, use_conv_bias=False,
                               chunk_size=8)),
    "mom_gated_deltanet": dict(mixer="mom_gated_deltanet", fla="fla.layers.mom.MomAttention", config=dict(conv_size=1),
                               kwargs=dict(head_dim=16, expand_v=1, num_memories=MEMORIES, topk=2, shared_mem=True),
                               tie=_tie_mom, context=_stable_argsort, names=_mom_names(MEMORIES)),
    "gsa": dict(mixer="gsa", fla="fla.layers.gsa.GatedSlotAttention", kwargs=dict(num_slots=8, use_short_conv=False),
                config=dict(num_heads=1, conv_size=0, **FUSED_NORM), names={
        **{f"{p}_proj.weight": (f"{p}_proj.proj.weight", None) for p in "qkv"}, **_proj("f", "o"),
        "g_norm.weight": ("norm.weight", None)}),
    "hgrn2": dict(mixer="hgrn2", fla="fla.layers.hgrn2.HGRN2Attention", config=dict(num_heads=1, **FUSED_NORM),
                  kwargs=dict(expand_ratio=None, use_short_conv=True), names={
        **{f"{p}_proj.weight": (f"{p}_proj.proj.weight", None) for p in "qfi"},
        **{f"{p}_conv1d.weight": (f"{p}_proj.conv.weight", _conv) for p in "qfi"},
        "g_norm.weight": ("norm.weight", None), "o_proj.weight": ("o_proj.weight", None)}),
}


def _compare(case: str) -> dict:
    """Runs under the interpreter: relative errors of output and gradients for ``LAYERS[case]``."""
    import importlib

    from linear_moe.kernels.testing import rel_error
    from linear_moe.model import preset
    from linear_moe.model.mixers import MIXERS
    from linear_moe.model.mixers.value_residual import value_residual_scope

    spec = LAYERS[case]
    layer_idx = spec.get("layer_idx", 0)
    torch.manual_seed(0)
    config = preset("tiny", lsm_mixer=spec["mixer"], lsm_backend="chunk", chunk_size=8, **spec.get("config", {}))
    ours = MIXERS[spec["mixer"]](config, layer_idx=layer_idx)
    module, cls = spec["fla"].rsplit(".", 1)
    shared = dict(hidden_size=config.hidden_size, num_heads=config.num_heads, conv_size=config.conv_size,
                  norm_eps=config.norm_eps, layer_idx=layer_idx)
    fla_layer = getattr(importlib.import_module(module), cls)(
        **{key: shared[key] for key in spec.get("shared", shared)}, **spec["kwargs"])
    with torch.no_grad():
        for param in ours.parameters():  # off the initial values (unit norms, zero biases) that hide terms
            param.add_(0.1 * torch.randn_like(param))
    spec.get("tie", _same)(ours)
    params, names = dict(ours.named_parameters()), spec["names"]
    unmapped = set(params) - {n for our, _ in names.values() for n in _names(our)}
    assert not unmapped, f"{case}: parameters with no fla counterpart: {sorted(unmapped)}"
    with torch.no_grad():
        fla_layer.load_state_dict({fla_name: (fn or _same)(*(params[n] for n in _names(our))).clone()
                                   for fla_name, (our, fn) in names.items()}, strict=True)
    B, T = 2, 20
    x = torch.randn(B, T, config.hidden_size)
    v_first = torch.randn(B, T, config.num_heads * config.value_dim)  # an earlier layer's value (layer_idx > 0)
    x_ours, x_fla = x.clone().requires_grad_(), x.clone().requires_grad_()
    with value_residual_scope() as slot:
        slot.v_first = v_first.view(B, T, config.num_heads, config.value_dim)
        y_ours = ours(x_ours)[0]
    with spec.get("context", contextlib.nullcontext)():
        y_fla = fla_layer(x_fla, v_first=v_first) if spec["mixer"] == "rwkv7" else fla_layer(x_fla)
    y_fla = y_fla[0] if isinstance(y_fla, tuple) else y_fla  # fla's Based layers return the output alone
    weights = torch.randn(y_ours.shape)
    (y_ours * weights).sum().backward()
    (y_fla * weights).sum().backward()
    errors = {"y": rel_error(y_fla, y_ours), "dx": rel_error(x_fla.grad, x_ours.grad)}
    fla_params = dict(fla_layer.named_parameters())
    pulled = {name: torch.zeros_like(param) for name, param in params.items()}  # fla's gradients, in our layout
    for fla_name, (our, fn) in names.items():
        leaves = [params[n].detach().clone().requires_grad_() for n in _names(our)]
        grads = torch.autograd.grad((fn or _same)(*leaves), leaves, fla_params[fla_name].grad, allow_unused=True)
        for n, grad in zip(_names(our), grads):
            pulled[n] += 0 if grad is None else grad
    for name, param in params.items():
        errors[f"d{name}"] = rel_error(pulled[name], param.grad)
    return errors


def _compare_all() -> None:
    print(json.dumps({name: _compare(name) for name in LAYERS}))


@pytest.fixture(scope="module")
def errors():
    proc = run_interpreted(__file__, "_compare_all", timeout=900)
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_mixer_equals_the_fla_layer(errors, name):
    ours = {f"d{n}" for our, _ in LAYERS[name]["names"].values() for n in _names(our)}
    assert set(errors[name]) == {"y", "dx"} | ours
    spec = LAYERS[name]
    loose = spec.get("loose", tuple(errors[name]))  # the keys held to ``ratio``; the others to RATIO

    def ratio(key: str) -> float:
        return spec.get("ratio", RATIO) if key.startswith(loose) else RATIO

    bad = {key: (value, ratio(key)) for key, value in errors[name].items() if not value <= ratio(key)}
    assert not bad, f"{name} vs fla: relative errors above their bounds (error, bound): {bad}"
