"""Mixture-of-Experts feed-forward: routers (registry), stacked SwiGLU experts, the MoE layer."""
from linear_moe.model.moe.experts import Dispatch, Experts, dispatch, expert_capacity
from linear_moe.model.moe.layer import MoELayer, MoEStats
from linear_moe.model.moe.losses import (
    BALANCE_LOSSES, load_balancing_loss, router_z_loss, sequence_load_balancing_loss,
)
from linear_moe.model.moe.router import ROUTERS, Router, Routing, register_router

__all__ = [
    "MoELayer", "MoEStats", "ROUTERS", "Router", "Routing", "register_router", "Experts", "Dispatch",
    "dispatch", "expert_capacity", "BALANCE_LOSSES", "load_balancing_loss", "sequence_load_balancing_loss",
    "router_z_loss",
]
