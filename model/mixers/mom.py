"""Mixture-of-Memories (Du et al., 2025): a router sends each token to ``k = config.memory_top_k`` of
``M = config.num_memories`` memories, plus one shared memory that every token uses.

Every memory is a recurrence over *all* tokens in which tokens not routed to it neither write nor
decay (k = 0 and g = 0 for GLA; beta = 0 and g = 0 for the delta rule); that equals running each
memory over its routed tokens only, but keeps one packed ``(B, T, (M+1) H, .)`` kernel call.
The short convs (one per memory for k and v) act on the full token stream before masking.

    w_t = renormalised top-k of softmax(W_r x_t)      (M,)
    o_t = sum_m w_t[m] q_t S^m_t + q_t S^shared_t     y_t = W_o (rmsnorm(o_t) * silu(W_g x_t))

State: ``"S"`` (N, (M+1) H, K, V) fp32, head index ``m * H + h`` with the shared memory last
(``m = M``); conv tails ``"conv_q"`` (N, H K, W-1), ``"conv_k"`` (N, (M+1) H K, W-1), ``"conv_v"``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from linear_moe.model.mixers.base import SINGLE_DEVICE, Linears, Mixer, MixerState, register_mixer
from linear_moe.model.mixers.common import (
    ConvProjection,
    GatedRMSNorm,
    check_varlen,
    core_backend,
    l2_normalize,
    merge_heads,
    split_heads,
)
from linear_moe.model.parallel import current_sequence_parallel


class Stacked(nn.ModuleList):
    """Concatenate the outputs of several projections along the last dim."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(x) for p in self], dim=-1)


class PerMemoryConvProjections(nn.ModuleList):
    """One :class:`ConvProjection` per memory, outputs concatenated memory-major ``(B, T, E*C)``.

    Each memory has its own short conv, so tensor parallelism shards every conv by heads, as it shards
    the projection before it (one conv over ``E*C`` channels would be split across memories instead).
    The conv tails share one state entry, ``(N, E*C, W-1)`` in the same memory-major order.
    """

    def forward(self, x_BTD, key: str, state: dict | None, new_state: dict | None, cu_seqlens=None):
        cache = None if state is None else state.get(key)
        caches = [None] * len(self) if cache is None else cache.chunk(len(self), dim=1)
        outputs, tails = [], []
        for member, member_cache in zip(self, caches):
            member_new = None if new_state is None else {}
            outputs.append(member(x_BTD, key, None if member_cache is None else {key: member_cache}, member_new,
                                  cu_seqlens))
            if member_new:
                tails.append(member_new[key])
        if tails:
            new_state[key] = torch.cat(tails, dim=1)
        return torch.cat(outputs, dim=-1)


def route(logits_BTM: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Renormalised top-k softmax routing: weights ``(B, T, M)`` (0 off the top k) and the 0/1 mask."""
    probs = logits_BTM.float().softmax(-1)
    top_w, top_i = probs.topk(top_k, dim=-1)
    top_w = top_w / top_w.sum(-1, keepdim=True)
    weights = torch.zeros_like(probs).scatter(-1, top_i, top_w)
    mask = torch.zeros_like(probs).scatter(-1, top_i, 1.0)
    return weights, mask


class MixtureOfMemories(Mixer):
    """Shared parts: router, shared q, per-memory k/v, output gate and norm.  Subclasses run the core."""

    def __init__(self, config, layer_idx: int = 0, linears: Linears = SINGLE_DEVICE):
        super().__init__(config, layer_idx, linears)
        D, H, K, V = config.hidden_size, config.num_heads, config.key_dim, config.value_dim
        self.num_heads = Hl = linears.local_heads(H)
        self.num_memories = config.num_memories
        self.top_k = config.memory_top_k
        E, W = self.num_memories + 1, config.conv_size  # E: routed memories + the shared one
        self.router = linears.replicated(D, self.num_memories)
        self.q_proj = ConvProjection(linears.column(D, H * K), Hl * K, W)
        self.k_proj = PerMemoryConvProjections(ConvProjection(linears.column(D, H * K), Hl * K, W) for _ in range(E))
        self.v_proj = PerMemoryConvProjections(ConvProjection(linears.column(D, H * V), Hl * V, W) for _ in range(E))
        self.g_proj = linears.column(D, H * V)
        self.norm = GatedRMSNorm(V, config.norm_eps)
        self.o_proj = linears.row(H * V, D)

    def core(self, x_BTD, q, k, v, mask_BTE, state, output_state, cu_seqlens):
        """Run the (M+1) H-head recurrence; ``mask_BTE`` is 1 where a token writes to a memory."""
        raise NotImplementedError

    def forward(self, x_BTD, state: MixerState | None = None, cu_seqlens=None, output_state: bool = False):
        check_varlen(x_BTD, cu_seqlens)
        new_state: MixerState | None = {} if output_state else None
        H, E = self.num_heads, self.num_memories + 1
        B, T, _ = x_BTD.shape
        weights_BTM, mask_BTM = route(self.router(x_BTD), self.top_k)
        ones = mask_BTM.new_ones(B, T, 1)
        weights_BTE, mask_BTE = torch.cat([weights_BTM, ones], -1), torch.cat([mask_BTM, ones], -1)
        q = split_heads(self.q_proj(x_BTD, "conv_q", state, new_state, cu_seqlens), H)
        q = q.unsqueeze(2).expand(B, T, E, H, q.shape[-1]).reshape(B, T, E * H, -1)
        k = split_heads(self.k_proj(x_BTD, "conv_k", state, new_state, cu_seqlens), E * H)
        v = split_heads(self.v_proj(x_BTD, "conv_v", state, new_state, cu_seqlens), E * H)
        o, S = self.core(x_BTD, q, k, v, mask_BTE.repeat_interleave(H, dim=-1), state, output_state, cu_seqlens)
        o = (o.unflatten(2, (E, H)) * weights_BTE[..., None, None].to(o.dtype)).sum(2)  # (B, T, H, V)
        o = self.norm(o, split_heads(self.g_proj(x_BTD), H))
        if new_state is not None:
            new_state["S"] = S
        return self.o_proj(merge_heads(o)), new_state

    def _kernel_kwargs(self, x_BTD, state, output_state, cu_seqlens) -> dict:
        return dict(initial_state=None if state is None else state.get("S"), output_final_state=output_state,
                    cu_seqlens=cu_seqlens, backend=core_backend(self.backend, x_BTD, state),
                    chunk_size=self.config.chunk_size)


@register_mixer("mom_gla")
class MoMGLA(MixtureOfMemories):
    """Memories are GLA recurrences with a low-rank diagonal decay per memory."""

    family = "diagonal_decay"
    gate_low_rank_dim = 16
    gate_logit_normalizer = 16

    def __init__(self, config, layer_idx: int = 0, linears: Linears = SINGLE_DEVICE):
        super().__init__(config, layer_idx, linears)
        H, K = config.num_heads, config.key_dim
        self.gk_down = linears.replicated(config.hidden_size, self.gate_low_rank_dim)
        self.gk_up = Stacked(
            linears.column(self.gate_low_rank_dim, H * K, bias=True) for _ in range(self.num_memories + 1)
        )

    def core(self, x_BTD, q, k, v, mask_BTE, state, output_state, cu_seqlens):
        g = F.logsigmoid(split_heads(self.gk_up(self.gk_down(x_BTD)), q.shape[2]).float())
        mask = mask_BTE.unsqueeze(-1)
        g = g / self.gate_logit_normalizer * mask
        kwargs = self._kernel_kwargs(x_BTD, state, output_state, cu_seqlens)
        return current_sequence_parallel().gla(q, k * mask.to(k.dtype), v, g, **kwargs)


@register_mixer("mom_gated_deltanet")
class MoMGatedDeltaNet(MixtureOfMemories):
    """Memories are gated delta rules: ``beta = sigmoid(W_b x)``, ``g = -exp(A_log) softplus(W_a x + dt_bias)``,
    with L2-normalised q and k (``A_log`` and ``dt_bias`` per head, shared by the memories, as fla)."""

    family = "delta_rule"

    def __init__(self, config, layer_idx: int = 0, linears: Linears = SINGLE_DEVICE):
        super().__init__(config, layer_idx, linears)
        D, H, E = config.hidden_size, config.num_heads, self.num_memories + 1
        self.b_proj = Stacked(linears.column(D, H) for _ in range(E))
        self.a_proj = Stacked(linears.column(D, H) for _ in range(E))
        Hl = self.num_heads
        self.A_log = nn.Parameter(torch.empty(Hl).uniform_(1.0, 16.0).log())
        dt = torch.exp(torch.rand(Hl) * (torch.log(torch.tensor(0.1)) - torch.log(torch.tensor(1e-3)))
                       + torch.log(torch.tensor(1e-3))).clamp(min=1e-4)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus

    def core(self, x_BTD, q, k, v, mask_BTE, state, output_state, cu_seqlens):
        E = self.num_memories + 1
        beta = torch.sigmoid(self.b_proj(x_BTD).float()) * mask_BTE
        dt = F.softplus(self.a_proj(x_BTD).float() + self.dt_bias.repeat(E))
        g = -torch.exp(self.A_log.float()).repeat(E) * dt * mask_BTE
        kwargs = self._kernel_kwargs(x_BTD, state, output_state, cu_seqlens)
        return current_sequence_parallel().delta_rule(l2_normalize(q), l2_normalize(k), v, beta.to(v.dtype), g,
                                                      scale=q.shape[-1] ** -0.5, **kwargs)
