"""Feature maps ``phi`` for linear attention: ``phi(q_t) . phi(k_i)`` replaces ``exp(q_t . k_i)``.

Each map is a module built as ``cls(head_dim, num_heads)`` that maps ``(B, T, H, d) -> (B, T, H, out_dim)``;
learnable maps hold per-head parameters (``num_heads`` = heads on this tensor-parallel rank).
``ModelConfig.feature_map`` picks one from :data:`FEATURE_MAPS` by name.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

FEATURE_MAPS: dict[str, type["FeatureMap"]] = {}


def register_feature_map(name: str) -> Callable[[type], type]:
    def decorator(cls: type) -> type:
        FEATURE_MAPS[name] = cls
        return cls

    return decorator


def build_feature_map(name: str, head_dim: int, num_heads: int) -> "FeatureMap":
    if name not in FEATURE_MAPS:
        raise ValueError(f"ModelConfig.feature_map: unknown feature map {name!r}; known: {sorted(FEATURE_MAPS)}")
    return FEATURE_MAPS[name](head_dim, num_heads)


class FeatureMap(nn.Module):
    """Base: ``out_dim`` is the feature width produced from a ``head_dim`` input."""

    def __init__(self, head_dim: int, num_heads: int):
        super().__init__()
        self.head_dim = head_dim
        self.out_dim = head_dim


class _Elementwise(FeatureMap):
    fn: Callable[[torch.Tensor], torch.Tensor]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return type(self).fn(x)


@register_feature_map("elu")
class EluPlusOne(_Elementwise):
    """``elu(x) + 1`` (Katharopoulos et al., 2020): positive features."""

    fn = staticmethod(lambda x: F.elu(x) + 1)


@register_feature_map("relu")
class ReLUMap(_Elementwise):
    fn = staticmethod(F.relu)


@register_feature_map("identity")
class IdentityMap(_Elementwise):
    fn = staticmethod(lambda x: x)


@register_feature_map("silu")
class SiLUMap(_Elementwise):
    fn = staticmethod(F.silu)


@register_feature_map("dpfp")
class DPFP(FeatureMap):
    """Deterministic parameter-free projection (Schlag et al., 2021) with ``nu`` rolls: ``out = 2 d nu``."""

    nu = 2

    def __init__(self, head_dim: int, num_heads: int):
        super().__init__(head_dim, num_heads)
        self.out_dim = 2 * head_dim * self.nu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = torch.cat([F.relu(x), F.relu(-x)], dim=-1)
        return torch.cat([x2 * x2.roll(j, dims=-1) for j in range(1, self.nu + 1)], dim=-1)


class PerHeadLinear(nn.Module):
    """``(B, T, H, d_in) -> (B, T, H, d_out)`` with one weight and bias per head, identity-initialised."""

    def __init__(self, num_heads: int, d_in: int, d_out: int, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.eye(d_in, d_out).expand(num_heads, d_in, d_out).clone())
        self.bias = nn.Parameter(torch.zeros(num_heads, d_out)) if bias else None

    def forward(self, x_BTHd: torch.Tensor) -> torch.Tensor:
        y = torch.einsum("bthd,hde->bthe", x_BTHd, self.weight)
        return y if self.bias is None else y + self.bias


@register_feature_map("hedgehog")
class Hedgehog(FeatureMap):
    """Hedgehog (Zhang et al., 2024): ``[softmax(W x), softmax(-W x)]``, learnable per head; ``out = 2d``."""

    def __init__(self, head_dim: int, num_heads: int):
        super().__init__(head_dim, num_heads)
        self.out_dim = 2 * head_dim
        self.layer = PerHeadLinear(num_heads, head_dim, head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.layer(x)
        return torch.cat([z.softmax(-1), (-z).softmax(-1)], dim=-1)


@register_feature_map("t2r")
class T2R(FeatureMap):
    """Transformer-to-RNN (Kasai et al., 2021): ``relu(W x + b)``, learnable per head."""

    def __init__(self, head_dim: int, num_heads: int):
        super().__init__(head_dim, num_heads)
        self.layer = PerHeadLinear(num_heads, head_dim, head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.layer(x))


def _pairs(d: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(torch.triu_indices(d, d, 1, device=device))


@register_feature_map("taylor")
class Taylor(FeatureMap):
    """Based's 2nd-order Taylor map: ``phi(q).phi(k) = 1 + q.k/sqrt(d) + (q.k)^2/(2d)``.

    ``out = 1 + d + d(d+1)/2``: a constant, ``x / d^(1/4)``, ``x_i^2 / sqrt(2d)``, ``x_i x_j / sqrt(d)`` (i < j).
    """

    def __init__(self, head_dim: int, num_heads: int):
        super().__init__(head_dim, num_heads)
        self.out_dim = 1 + head_dim + head_dim * (head_dim + 1) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.head_dim
        i, j = _pairs(d, x.device)
        return torch.cat(
            [torch.ones_like(x[..., :1]), x / d**0.25, x * x / math.sqrt(2 * d), x[..., i] * x[..., j] / math.sqrt(d)],
            dim=-1,
        )


class RebasedMap(FeatureMap):
    """ReBased (Aksenov et al., 2024): ``y = layernorm(x) * gamma + beta``, then ``phi(q).phi(k) = (y_q.y_k)^2 / d``.

    Learnable ``gamma, beta`` per head; ``out = d(d+1)/2``.
    """

    def __init__(self, head_dim: int, num_heads: int, eps: float = 1e-5):
        super().__init__(head_dim, num_heads)
        self.out_dim = head_dim * (head_dim + 1) // 2
        self.eps = eps
        self.gamma = nn.Parameter(torch.ones(num_heads, head_dim))
        self.beta = nn.Parameter(torch.zeros(num_heads, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.head_dim
        y = F.layer_norm(x, (d,), eps=self.eps) * self.gamma + self.beta
        i, j = _pairs(d, x.device)
        return torch.cat([y * y / math.sqrt(d), y[..., i] * y[..., j] * math.sqrt(2 / d)], dim=-1)
