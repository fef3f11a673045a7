"""``ModelConfig``: every architecture field of a Linear-MoE model, validated in one place.

Classes are referred to by registry name (``lsm_mixer``, ``moe_router``, ``feature_map``) so the
config stays JSON-serialisable.  Presets are plain entries in :data:`PRESETS`.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from linear_moe.model.field_types import check_dataclass_types
from linear_moe.model.layer_pattern import parse_layer_pattern

LSM_BACKENDS = ("auto", "chunk", "naive", "fla")


#: fields that must be > 0, and >= 0 (0 means "off" or "derive it", as their comments say)
_POSITIVE = ("vocab_size", "hidden_size", "num_layers", "num_heads", "norm_eps", "max_position_embeddings",
             "chunk_size", "num_memories", "num_slots", "state_size", "rope_theta", "moe_ffn_hidden_size")
_NON_NEGATIVE = ("conv_size", "num_kv_heads", "ffn_hidden_size", "num_shared_experts", "initializer_range",
                 "moe_aux_loss_coeff", "moe_z_loss_coeff", "moe_bias_update_rate")


@dataclass
class ModelConfig:
    # --- trunk ---
    vocab_size: int = 32000  # embedding rows; must be >= the tokenizer's vocabulary
    hidden_size: int = 1024  # model width D
    num_layers: int = 12  # number of blocks; equals len(layer_pattern)
    layer_pattern: str = ""  # one symbol per layer, see model/layer_pattern.py; "" = all "L"
    norm_eps: float = 1e-6  # RMSNorm epsilon
    tie_word_embeddings: bool = False  # share input embedding and LM head
    initializer_range: float = 0.02  # std of the normal init
    max_position_embeddings: int = 4096  # RoPE table length for attention layers

    # --- LSM mixer ---
    lsm_mixer: str = "gla"  # registry name in model/mixers (e.g. gla, deltanet, mamba2, rwkv7)
    num_heads: int = 8  # heads of LSM and attention mixers
    expand_k: float = 1.0  # key/query width = expand_k * head_dim per head
    expand_v: float = 1.0  # value width = expand_v * head_dim per head
    feature_map: str = "elu"  # q/k feature map of linear_attention (elu, relu, identity, ...)
    conv_size: int = 4  # short causal depthwise conv before q/k/v (0 disables)
    lsm_backend: str = "auto"  # auto | chunk (PyTorch chunked) | naive (oracle) | fla (Triton)
    chunk_size: int = 64  # chunk length of the chunked CPU path
    num_memories: int = 4  # Mixture-of-Memories: memories per layer
    memory_top_k: int = 2  # Mixture-of-Memories: memories each token writes to
    num_slots: int = 64  # gated slot attention: slots per head
    state_size: int = 64  # mamba2: SSM state width N per head
    value_residual: bool = True  # rwkv7: later layers mix their value toward the first LSM layer's (v_first)

    # --- softmax attention (hybrid layers) ---
    num_kv_heads: int = 0  # GQA key/value heads; 0 = num_heads
    rope_theta: float = 10000.0  # RoPE base

    # --- feed-forward ---
    ffn_hidden_size: int = 0  # dense SwiGLU width; 0 = 4 * hidden_size * 2/3 rounded to 64
    num_experts: int = 64  # routed experts per MoE layer
    moe_top_k: int = 8  # experts per token
    moe_ffn_hidden_size: int = 896  # SwiGLU width of each expert
    num_shared_experts: int = 0  # always-on experts (DeepSeek style), width moe_ffn_hidden_size each
    shared_expert_gate: bool = False  # scale the shared-expert output by a learned sigmoid gate
    moe_router: str = "softmax_topk"  # softmax_topk | mixtral (renormalised top-k) | sigmoid_bias
    moe_aux_loss_coeff: float = 1e-2  # load-balancing loss weight (sigmoid_bias balances by its bias: 0 is usual)
    moe_aux_loss_type: str = "aux_loss"  # aux_loss (over the micro-batch) | seq_aux_loss (per sequence, DeepSeek-V3)
    moe_z_loss_coeff: float = 1e-3  # router z-loss weight
    moe_capacity_factor: float | None = None  # None = dropless; else each expert keeps its ceil(T*K/E*c) heaviest
    moe_bias_update_rate: float = 1e-3  # sigmoid_bias: step of the balancing-bias update

    # --- derived (set in __post_init__, not serialised) ---
    head_dim: int = field(init=False, repr=False)

    def __post_init__(self) -> None:
        check_dataclass_types(self)  # "4" for an int, "no" for a bool: an error naming the field
        if not self.layer_pattern:
            self.layer_pattern = "L" * self.num_layers
        for name in _POSITIVE:
            _check(getattr(self, name) > 0, name, f"must be positive, got {getattr(self, name)}")
        for name in _NON_NEGATIVE:
            _check(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        self.layer_kinds  # parses and checks the pattern against num_layers
        _check(
            self.hidden_size % self.num_heads == 0,
            "num_heads",
            f"num_heads={self.num_heads} must divide hidden_size={self.hidden_size}",
        )
        self.head_dim = self.hidden_size // self.num_heads
        if self.num_kv_heads == 0:
            self.num_kv_heads = self.num_heads
        _check(
            self.num_heads % self.num_kv_heads == 0,
            "num_kv_heads",
            f"num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads}",
        )
        if self.ffn_hidden_size == 0:
            self.ffn_hidden_size = _round_up(int(8 * self.hidden_size / 3), 64)
        for name in ("expand_k", "expand_v"):
            value = getattr(self, name)
            _check(value > 0 and float(value * self.head_dim).is_integer(), name,
                   f"{name}={value} times head_dim={self.head_dim} must be a positive integer")
        _check(self.lsm_backend in LSM_BACKENDS, "lsm_backend", f"{self.lsm_backend!r} not in {LSM_BACKENDS}")
        from linear_moe.model.mixers import MIXERS  # local import: mixers import this module

        _check(self.lsm_mixer in MIXERS, "lsm_mixer", f"unknown mixer {self.lsm_mixer!r}; known: {sorted(MIXERS)}")
        MIXERS[self.lsm_mixer].validate_config(self)
        if self.has_moe:
            _check(self.num_experts > 0, "num_experts", f"must be positive, got {self.num_experts}")
            _check(
                0 < self.moe_top_k <= self.num_experts,
                "moe_top_k",
                f"moe_top_k={self.moe_top_k} must be in [1, num_experts={self.num_experts}]",
            )
        from linear_moe.model.moe.router import ROUTERS  # local import, like MIXERS above

        _check(self.moe_router in ROUTERS, "moe_router", f"unknown router {self.moe_router!r}; known: {sorted(ROUTERS)}")
        from linear_moe.model.moe.losses import BALANCE_LOSSES

        _check(self.moe_aux_loss_type in BALANCE_LOSSES, "moe_aux_loss_type",
               f"unknown load-balancing loss {self.moe_aux_loss_type!r}; known: {sorted(BALANCE_LOSSES)}")
        _check(
            self.moe_capacity_factor is None or self.moe_capacity_factor > 0,
            "moe_capacity_factor",
            f"must be None (dropless) or positive, got {self.moe_capacity_factor}",
        )
        _check(0 < self.memory_top_k <= self.num_memories, "memory_top_k",
               f"memory_top_k={self.memory_top_k} must be in [1, num_memories={self.num_memories}]")

    # ------------------------------------------------------------------ derived views
    @property
    def layer_kinds(self):
        return parse_layer_pattern(self.layer_pattern, self.num_layers)

    @property
    def has_moe(self) -> bool:
        """Whether any layer of the pattern takes an MoE feed-forward."""
        return any(kind.is_moe for kind in self.layer_kinds)

    @property
    def key_dim(self) -> int:
        """Per-head key/query width of LSM mixers."""
        return int(self.expand_k * self.head_dim)

    @property
    def value_dim(self) -> int:
        """Per-head value width of LSM mixers."""
        return int(self.expand_v * self.head_dim)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"ModelConfig: unknown field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> "ModelConfig":
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            text = Path(text).read_text()
        return cls.from_dict(json.loads(text))

    def replace(self, **changes: Any) -> "ModelConfig":
        return type(self).from_dict({**self.to_dict(), **changes})


def _check(condition: bool, field_name: str, message: str) -> None:
    if not condition:
        raise ValueError(f"ModelConfig.{field_name}: {message}")


def _round_up(x: int, multiple: int) -> int:
    return (x + multiple - 1) // multiple * multiple


# ---------------------------------------------------------------------- presets
PRESETS: dict[str, dict[str, Any]] = {
    # Linear-MoE paper sizes: "A<activated>-<total>".
    "A0.3B-2B": dict(num_layers=12, hidden_size=1024, num_heads=8, num_experts=64, moe_top_k=8,
                     moe_ffn_hidden_size=896, vocab_size=32000),
    "A1B-7B": dict(num_layers=16, hidden_size=2048, num_heads=16, num_experts=64, moe_top_k=8,
                   moe_ffn_hidden_size=1024, vocab_size=32000),
    # Tiny presets that train on a CPU in seconds.
    "tiny": dict(num_layers=2, hidden_size=64, num_heads=4, num_experts=4, moe_top_k=2,
                 moe_ffn_hidden_size=64, ffn_hidden_size=128, vocab_size=512, chunk_size=16,
                 num_slots=8, state_size=16, max_position_embeddings=1024),
    "tiny-hybrid": dict(num_layers=4, layer_pattern="LLLA", hidden_size=64, num_heads=4, num_experts=4,
                        moe_top_k=2, moe_ffn_hidden_size=64, ffn_hidden_size=128, vocab_size=512,
                        chunk_size=16, num_slots=8, state_size=16, max_position_embeddings=1024),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """Build the named preset, with field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}")
    return ModelConfig.from_dict({**PRESETS[name], **overrides})
