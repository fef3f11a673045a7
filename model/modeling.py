"""The single-device Linear-MoE causal LM, registered with transformers' Auto classes on import.

``LinearMoEForCausalLM`` reads like nanoGPT: embedding, a stack of :class:`Block` built from the
layer pattern, final RMSNorm, LM head.  Parallelism lives in ``model/megatron`` and
``model/parallel``; nothing here knows about it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from linear_moe.model.blocks import Block
from linear_moe.model.config import ModelConfig
from linear_moe.model.mixers import MixerState
from linear_moe.model.mixers.value_residual import value_residual_scope

MODEL_TYPE = "linear_moe"


class LinearMoEConfig(PretrainedConfig):
    """Hugging Face view of :class:`ModelConfig`; every ModelConfig field is an attribute."""

    model_type = MODEL_TYPE

    def __init__(self, **kwargs):
        fields = set(ModelConfig.__dataclass_fields__)
        model_fields = {k: kwargs.pop(k) for k in list(kwargs) if k in fields and k != "head_dim"}
        kwargs.pop("head_dim", None)
        self._model_config = ModelConfig.from_dict(model_fields)  # validates
        for key, value in self._model_config.to_dict().items():
            setattr(self, key, value)
        kwargs.setdefault("tie_word_embeddings", self._model_config.tie_word_embeddings)
        super().__init__(**kwargs)

    @classmethod
    def from_model_config(cls, config: ModelConfig, **kwargs) -> "LinearMoEConfig":
        return cls(**config.to_dict(), **kwargs)

    def to_model_config(self) -> ModelConfig:
        return ModelConfig.from_dict({k: getattr(self, k) for k in ModelConfig.__dataclass_fields__ if k != "head_dim"})

    def to_dict(self):
        out = super().to_dict()
        out.pop("_model_config", None)
        return out


class RecurrentCache:
    """Per-layer mixer states for decoding: O(1) matrix states for LSM layers, KV for attention."""

    def __init__(self, num_layers: int):
        self.states: list[MixerState | None] = [None] * num_layers
        self.seen_tokens = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for state in self.states:
            if state is not None:
                for key, tensor in state.items():
                    state[key] = tensor.index_select(0, beam_idx.to(tensor.device))


@dataclass
class LinearMoEOutput(ModelOutput):
    """``logits`` (B, T, V); ``loss`` = LM loss + MoE losses; per-layer ``tokens_per_expert`` (E,)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: RecurrentCache | None = None
    lm_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    tokens_per_expert: tuple[torch.Tensor, ...] | None = None


class LinearMoEPreTrainedModel(PreTrainedModel):
    config_class = LinearMoEConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["Block"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.RMSNorm) and module.weight is not None:
            nn.init.ones_(module.weight)


class LinearMoEModel(LinearMoEPreTrainedModel):
    """Embedding + blocks + final norm: ``input_ids (B, T) -> hidden (B, T, D)``."""

    def __init__(self, config: LinearMoEConfig):
        super().__init__(config)
        model_config = config.to_model_config()
        self.embed_tokens = nn.Embedding(model_config.vocab_size, model_config.hidden_size)
        self.layers = nn.ModuleList(
            Block(model_config, i, kind) for i, kind in enumerate(model_config.layer_kinds)
        )
        self.norm = nn.RMSNorm(model_config.hidden_size, eps=model_config.norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(self, input_ids: torch.LongTensor, cache: RecurrentCache | None = None,
                use_cache: bool = False, cu_seqlens: torch.LongTensor | None = None):
        """Returns ``(hidden_BTD, cache, aux_loss, tokens_per_expert)``."""
        if cu_seqlens is not None and (use_cache or cache is not None):
            raise ValueError("cu_seqlens (packed training input) cannot be combined with a decoding cache")
        if use_cache and cache is None:
            cache = RecurrentCache(len(self.layers))
        x_BTD = self.embed_tokens(input_ids)
        aux_loss = x_BTD.new_zeros(())
        tokens_per_expert = []
        with value_residual_scope():  # RWKV7's v_first travels from the first LSM layer to the later ones
            for i, layer in enumerate(self.layers):
                state = cache.states[i] if cache is not None else None
                x_BTD, new_state, stats = layer(x_BTD, state=state, cu_seqlens=cu_seqlens,
                                                output_state=cache is not None)
                if cache is not None:
                    cache.states[i] = new_state
                if stats is not None:
                    aux_loss = aux_loss + stats.aux_loss + stats.z_loss
                    tokens_per_expert.append(stats.tokens_per_expert)
        if cache is not None:
            cache.seen_tokens += input_ids.shape[1]
        return self.norm(x_BTD), cache, aux_loss, tuple(tokens_per_expert)


class LinearMoEForCausalLM(LinearMoEPreTrainedModel, GenerationMixin):
    """Causal LM head over :class:`LinearMoEModel`; ``generate()`` decodes with recurrent states."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: LinearMoEConfig):
        super().__init__(config)
        self.model = LinearMoEModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # states are RecurrentCache, not transformers KV caches

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor,
        labels: torch.LongTensor | None = None,
        cache: RecurrentCache | None = None,
        use_cache: bool | None = None,
        cu_seqlens: torch.LongTensor | None = None,
        logits_to_keep: int = 0,
        attention_mask: torch.Tensor | None = None,
        **_: object,
    ) -> LinearMoEOutput:
        """``input_ids`` (B, T); ``labels`` (B, T) already aligned with ``input_ids`` (shifted
        inside, ``-100`` ignored); ``cu_seqlens`` packs documents when ``B == 1``."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("padding (attention_mask with zeros) is not supported: pack sequences with cu_seqlens")
        hidden_BTD, cache, aux_loss, tokens_per_expert = self.model(
            input_ids, cache=cache, use_cache=bool(use_cache), cu_seqlens=cu_seqlens
        )
        if logits_to_keep:
            hidden_BTD = hidden_BTD[:, -logits_to_keep:]
        logits_BTV = self.lm_head(hidden_BTD)
        loss = lm_loss = None
        if labels is not None:
            lm_loss = causal_lm_loss(logits_BTV, labels, cu_seqlens)
            loss = lm_loss + aux_loss
        return LinearMoEOutput(loss=loss, logits=logits_BTV, cache=cache, lm_loss=lm_loss, aux_loss=aux_loss,
                               tokens_per_expert=tokens_per_expert)

    def prepare_inputs_for_generation(self, input_ids, cache=None, **kwargs):
        if cache is not None:
            input_ids = input_ids[:, cache.get_seq_length():]
        return {"input_ids": input_ids, "cache": cache, "use_cache": kwargs.get("use_cache", True)}


def causal_lm_loss(logits_BTV: torch.Tensor, labels_BT: torch.Tensor,
                   cu_seqlens: torch.LongTensor | None = None) -> torch.Tensor:
    """Mean next-token cross entropy; no prediction crosses a document boundary of ``cu_seqlens``."""
    targets_BT = labels_BT[:, 1:].clone()
    if cu_seqlens is not None:
        ends = cu_seqlens[1:-1] - 1  # last position of every document but the final one
        targets_BT[:, ends[ends < targets_BT.shape[1]]] = -100
    return F.cross_entropy(logits_BTV[:, :-1].flatten(0, 1).float(), targets_BT.flatten(), ignore_index=-100)


AutoConfig.register(MODEL_TYPE, LinearMoEConfig, exist_ok=True)
AutoModelForCausalLM.register(LinearMoEConfig, LinearMoEForCausalLM, exist_ok=True)
