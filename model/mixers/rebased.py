"""ReBased (Aksenov et al., 2024): Based with a learnable quadratic feature map and no constant or
linear term: ``phi(q).phi(k) = (y_q . y_k)^2 / d`` with ``y = layernorm(x) * gamma + beta`` per head.

State: ``"S"`` (N, H, d(d+1)/2, V + 1) fp32; the last column holds the key sum (normaliser).
"""
from __future__ import annotations

from linear_moe.model.mixers.base import register_mixer
from linear_moe.model.mixers.based import Based
from linear_moe.model.mixers.feature_maps import RebasedMap


@register_mixer("rebased")
class Rebased(Based):
    feature_map_cls = RebasedMap
