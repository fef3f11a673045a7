"""RWKV7 time-mix (Peng et al., 2025) around the DPLR delta rule in ``kernels.dplr``.

    x^c = x + (x_{t-1} - x) * mu_c   for c in r, w, k, v, a, g        (token shift)
    w = -e^-1/2 sigmoid(lora_w(x^w))  (log-decay in [-0.61, 0)),  a = sigmoid(lora_a(x^a))
    kk = l2norm(k * k_k),  k <- k * (1 + (a - 1) * k_a)
    v <- lerp(v, v_first, sigmoid(lora_v(x^v)))   (value residual: every LSM layer but the first)
    S_t = (diag(exp(w_t)) - (kk_t * a_t) kk_t^T) S_{t-1} + k_t v_t^T,   o_t = r_t^T S_t   (scale 1)
    y = W_o ((groupnorm(o) + (r . (k * r_k)) v) * lora_g(x^g))

Follows fla's RWKV7Attention. ``v_first`` is the first LSM layer's value in the same forward
(:mod:`~linear_moe.model.mixers.value_residual`); ``ModelConfig.value_residual=False`` gives every
layer its own v. State: ``"S"`` (N, H, K, V) fp32 and ``"shift"`` (N, D), the last input token.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from linear_moe.model.mixers.base import SINGLE_DEVICE, Linears, Mixer, MixerState, register_mixer
from linear_moe.model.mixers.common import check_varlen, core_backend, merge_heads, split_heads, token_shift
from linear_moe.model.mixers.value_residual import current_value_residual, first_lsm_layer
from linear_moe.model.parallel import current_sequence_parallel

W_SCALE = math.exp(-0.5)  # bound of the log-decay magnitude, as in RWKV7


class LoRA(nn.Module):
    """``up(act(down(x)))``: down replicated over TP, up column-parallel (head-structured output)."""

    def __init__(self, linears: Linears, dim_in: int, dim_out: int, rank: int, activation, bias: bool = True):
        super().__init__()
        self.down = linears.replicated(dim_in, rank)
        self.up = linears.column(rank, dim_out, bias=bias)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.activation(self.down(x)))


def lora_rank(factor: float, hidden_size: int) -> int:
    """RWKV7's low-rank widths scale with sqrt(D); rounded to 16, at least 16."""
    return max(16, 16 * round(factor * math.sqrt(hidden_size) / 16))


@register_mixer("rwkv7")
class RWKV7(Mixer):
    family = "dplr"
    mix_names = ("r", "w", "k", "v", "a", "g")

    @classmethod
    def validate_config(cls, config) -> None:
        if config.key_dim != config.value_dim:
            raise ValueError(f"ModelConfig.expand_v: rwkv7 needs expand_k == expand_v, got {config.expand_k} and "
                             f"{config.expand_v}")

    @classmethod
    def crosses_layers(cls, config) -> bool:
        return config.value_residual

    def __init__(self, config, layer_idx: int = 0, linears: Linears = SINGLE_DEVICE):
        super().__init__(config, layer_idx, linears)
        D, H, K, V = config.hidden_size, config.num_heads, config.key_dim, config.value_dim
        self.num_heads = Hl = linears.local_heads(H)
        self.mix_CD = nn.Parameter(torch.zeros(len(self.mix_names), D))  # token-shift mixing mu_c
        self.r_proj = linears.column(D, H * K)
        self.k_proj = linears.column(D, H * K)
        self.v_proj = linears.column(D, H * V)
        self.w_lora = LoRA(linears, D, H * K, lora_rank(2.5, D), torch.tanh)
        self.a_lora = LoRA(linears, D, H * K, lora_rank(2.5, D), lambda t: t)
        self.g_lora = LoRA(linears, D, H * V, lora_rank(5.0, D), torch.sigmoid, bias=False)
        self.stores_v_first = layer_idx == first_lsm_layer(config)
        # later layers: how far each value channel moves toward v_first
        self.v_lora = (LoRA(linears, D, H * V, lora_rank(1.7, D), lambda t: t)
                       if config.value_residual and not self.stores_v_first else None)
        self.k_k = nn.Parameter(torch.full((Hl, K), 0.85))
        self.k_a = nn.Parameter(torch.ones(Hl, K))
        self.r_k = nn.Parameter(torch.full((Hl, K), -0.04))
        self.g_norm = nn.GroupNorm(Hl, Hl * V, eps=K * config.norm_eps)
        self.o_proj = linears.row(H * V, D)
        self._init_rwkv(D, K)

    @torch.no_grad()
    def _init_rwkv(self, D: int, K: int) -> None:
        """RWKV7's depth-dependent mixing ramps and per-channel decay biases (simplified)."""
        depth = self.layer_idx / max(self.config.num_layers - 1, 1)
        ramp_D = torch.arange(D) / D
        for i, power in enumerate((0.2, 0.9, 0.7, 0.7, 0.9, 0.2)):
            self.mix_CD[i] = 1.0 - ramp_D.pow(power * (1.0 - depth))
        channel = torch.arange(self.num_heads * K) % K / max(K - 1, 1)
        # sigmoid(bias) sets the initial decay: slower in later channels of each head
        self.w_lora.up.bias.copy_(-6 + 6 * channel ** (1 + depth ** 0.3) + 0.5)
        self.a_lora.up.bias.copy_(-0.19 + 0.4 * (channel - 0.5))
        if self.v_lora is not None:  # sigmoid(bias) ~ 0.6-0.7: start mostly toward v_first, as RWKV7 does
            self.v_lora.up.bias.copy_(0.73 - 0.4 * (channel - 0.5))

    def forward(self, x_BTD, state: MixerState | None = None, cu_seqlens=None, output_state: bool = False):
        check_varlen(x_BTD, cu_seqlens)
        H = self.num_heads
        x_prev, last_ND = token_shift(x_BTD, None if state is None else state.get("shift"), cu_seqlens)
        xr, xw, xk, xv, xa, xg = (x_BTD + (x_prev - x_BTD) * mu_D for mu_D in self.mix_CD)
        r = split_heads(self.r_proj(xr), H)
        w = -W_SCALE * torch.sigmoid(split_heads(self.w_lora(xw), H).float())
        k = split_heads(self.k_proj(xk), H)
        v = self._value_residual(split_heads(self.v_proj(xv), H), xv)
        a = torch.sigmoid(split_heads(self.a_lora(xa), H))
        g = self.g_lora(xg)
        kk = F.normalize(k * self.k_k, dim=-1)
        k = k * (1 + (a - 1) * self.k_a)
        o, S = current_sequence_parallel().dplr(
            r, k, v, -kk, kk * a, w, scale=1.0, initial_state=None if state is None else state.get("S"),
            output_final_state=output_state, cu_seqlens=cu_seqlens,
            backend=core_backend(self.backend, x_BTD, state), chunk_size=self.config.chunk_size,
        )
        B, T = x_BTD.shape[:2]
        o = self.g_norm(merge_heads(o).reshape(B * T, -1)).reshape(B, T, H, -1)
        bonus_BTH1 = (r * k * self.r_k).sum(-1, keepdim=True)  # per-head "current token" term
        o = merge_heads(o + bonus_BTH1 * v) * g
        new_state = {"S": S, "shift": last_ND} if output_state else None
        return self.o_proj(o), new_state

    def _value_residual(self, v_BTHV: torch.Tensor, xv_BTD: torch.Tensor) -> torch.Tensor:
        """The first LSM layer publishes its value; later ones lerp toward it (``config.value_residual``)."""
        if not self.config.value_residual:
            return v_BTHV
        slot = current_value_residual()
        if self.stores_v_first:
            if slot is not None:
                slot.v_first = v_BTHV
            return v_BTHV
        if slot is None or slot.v_first is None:
            raise ValueError(f"rwkv7 layer {self.layer_idx}: the value residual needs the first LSM layer's value from "
                             "the same forward; run the mixer inside the model (value_residual_scope), or set "
                             "ModelConfig.value_residual=False")
        gate = torch.sigmoid(split_heads(self.v_lora(xv_BTD), self.num_heads))
        return torch.lerp(v_BTHV, slot.v_first, gate)
