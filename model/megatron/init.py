"""Layout-independent initialisation of the megatron model: every tensor from its global identity.

Megatron draws each rank's shards from one seeded stream, so the initial model depends on the
layout (EP ranks get identical experts, PP stages repeat each other's layers). Here every tensor of
the *full* (TP = PP = EP = 1) model is drawn from a generator seeded by ``(seed, global name)``, and
each rank copies its slice, cut with :mod:`~linear_moe.model.megatron.state_dict`'s layout helpers.
The gathered initial model is therefore the same for every TP/PP/EP layout.

Conventions (megatron's): column linears ``config.init_method`` (normal(0, init_method_std)), row
(output) linears ``config.output_layer_init_method`` (std / sqrt(2 * num_layers)), biases zero, norms
one, routers ``init_method`` with a zero ``expert_bias``, embedding ``embedding_init_method``. A mixer
is rebuilt on its own, full-size, with ``MIXERS[name](model_config, layer_idx)`` under a seed of its
layer, so mixer-specific inits (A_log, dt_bias, decay ramps, conv kernels) are kept; its column/row/
replicated projections follow the linear conventions above. At most one mixer is materialised at once.
Routed experts are drawn per expert under their SequentialMLP names (``experts.local_experts.<e>.
linear_fc1.weight``), whichever module holds them, so a grouped-GEMM build (GroupedMLP, its experts
packed in ``weight1``/``weight2``) starts from the same experts as a per-expert one.
"""
from __future__ import annotations

import hashlib
from typing import Callable

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from megatron.core.transformer.moe.experts import GroupedMLP
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.moe.shared_experts import SharedExpertMLP
from torch import nn

from linear_moe.model.megatron.mixer_adapter import MixerAdapter
from linear_moe.model.megatron.state_dict import (
    Layout,
    RankCoords,
    global_key,
    local_entries,
    shard_layout,
    shard_state_dict,
)
from linear_moe.model.mixers import MIXERS
from linear_moe.model.mixers.base import Linears

#: fills a full-shape fp32 tensor in place from the (seeded) global CPU generator
Fill = Callable[[torch.Tensor, object], None]


def _init_method(tensor: torch.Tensor, config) -> None:
    config.init_method(tensor)


def _output_init_method(tensor: torch.Tensor, config) -> None:
    config.output_layer_init_method(tensor)


def _embedding_init_method(tensor: torch.Tensor, config) -> None:
    config.embedding_init_method(tensor)


def _zeros(tensor: torch.Tensor, config) -> None:
    tensor.zero_()


def _ones(tensor: torch.Tensor, config) -> None:
    tensor.fill_(1.0)


#: module class -> {name of a tensor the module owns directly: how to fill its full tensor}.
#: Looked up along the module's MRO, so subclasses (e.g. MegatronLinears' wrappers) inherit a rule.
INIT_RULES: dict[type, dict[str, Fill]] = {
    ColumnParallelLinear: {"weight": _init_method, "bias": _zeros},
    RowParallelLinear: {"weight": _output_init_method, "bias": _zeros},
    VocabParallelEmbedding: {"weight": _embedding_init_method},
    TopKRouter: {"weight": _init_method, "bias": _init_method, "expert_bias": _zeros,
                 "local_tokens_per_expert": _zeros},
    SharedExpertMLP: {"gate_weight": _init_method},
    # packed experts: each expert's fc1 / fc2 filled like SequentialMLP's column / row linear
    GroupedMLP: {"weight1": _init_method, "weight2": _output_init_method},
    nn.RMSNorm: {"weight": _ones},
    nn.LayerNorm: {"weight": _ones, "bias": _zeros},
}

#: a tied output layer (last stage of a pipeline) is a copy of the embedding: same seed, same fill
_TIED = {"output_layer.weight": ("embedding.word_embeddings.weight", _embedding_init_method)}


def derived_seed(seed: int, name: str) -> int:
    """A 63-bit seed for ``name`` (a full-model tensor or module name), stable across processes."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class _ReferenceLinears(Linears):
    """Single-device projections initialised the megatron way (``tp_size = 1``): column and
    replicated weights with ``init_method``, row weights with ``output_layer_init_method``, zero biases."""

    def __init__(self, config) -> None:
        self.config = config

    def _linear(self, in_features: int, out_features: int, bias: bool, fill: Fill) -> nn.Module:
        linear = torch.nn.utils.skip_init(nn.Linear, in_features, out_features, bias=bias, dtype=torch.float32)
        with torch.no_grad():
            fill(linear.weight, self.config)
            if bias:
                linear.bias.zero_()
        return linear

    def column(self, in_features: int, out_features: int, bias: bool = False) -> nn.Module:
        return self._linear(in_features, out_features, bias, _init_method)

    def row(self, in_features: int, out_features: int, bias: bool = False) -> nn.Module:
        return self._linear(in_features, out_features, bias, _output_init_method)

    def replicated(self, in_features: int, out_features: int, bias: bool = False) -> nn.Module:
        return self._linear(in_features, out_features, bias, _init_method)


def reference_mixer_state(adapter: MixerAdapter, config, seed: int) -> dict[str, torch.Tensor]:
    """Full (single-device) state of ``adapter``'s mixer, keyed like ``adapter.state_dict()`` (``mixer.*``).

    Built with ``MIXERS[name](model_config, layer_idx)`` under a seed of the global layer index.
    """
    mixer = adapter.mixer
    name = type(mixer).registry_name
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derived_seed(seed, f"decoder.layers.{adapter.layer_idx}.self_attention"))
        reference = MIXERS[name](mixer.config, layer_idx=adapter.layer_idx, linears=_ReferenceLinears(config))
    return {f"mixer.{key}": value.detach() for key, value in reference.state_dict().items()}


def initialize_parameters(model: nn.Module, model_config, config, seed: int = 1234) -> None:
    """Re-initialise this rank's part of ``model`` (a megatron ``GPTModel``) from global identities.

    Call after building the model on every rank, with megatron's parallel state initialised.
    Every state-dict tensor gets the slice of its full tensor; ``config`` is the ``TransformerConfig``.
    Raises ``ValueError`` for a module that owns tensors but has no rule in :data:`INIT_RULES`.
    """
    layout = shard_layout(model, config.gated_linear_unit)
    coords = RankCoords.current(model_config.num_layers, model_config.num_experts)
    tied = _tied_names(model)
    local = model.state_dict(keep_vars=True)
    done = set()
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        for prefix, module in _owners(model):
            if isinstance(module, MixerAdapter):
                full = {rel_name: {global_key(prefix + rel_name, coords): tensor}
                        for rel_name, tensor in reference_mixer_state(module, config, seed).items()}
            else:
                full = _rule_tensors(module, prefix, local, layout, coords, config, seed, tied)
            for rel_name, full_tensors in full.items():
                key = prefix + rel_name
                if key in layout:
                    _copy_shard(local[key], full_tensors, key, layout, coords)
                    done.add(key)
    missing = sorted(set(layout) - done)
    if missing:
        raise ValueError(f"initialize_parameters: no full tensor for {missing}; the mixer's single-device build "
                         "lacks them or their module has no rule in INIT_RULES (model/megatron/init.py)")


def _owners(model: nn.Module):
    """``(prefix, module)`` for every mixer adapter (whole subtree) and every other module that owns tensors."""
    stack = [("", model)]
    while stack:
        prefix, module = stack.pop()
        if isinstance(module, MixerAdapter) or _direct_tensors(module):
            yield prefix, module
        if not isinstance(module, MixerAdapter):
            stack.extend((f"{prefix}{name}.", child) for name, child in reversed(list(module.named_children())))


def _direct_tensors(module: nn.Module) -> list[str]:
    return [name for name, _ in module.named_parameters(recurse=False)] + \
           [name for name, _ in module.named_buffers(recurse=False)]


def _rule_for(module: nn.Module, prefix: str) -> dict[str, Fill]:
    for cls in type(module).__mro__:
        if cls in INIT_RULES:
            return INIT_RULES[cls]
    raise ValueError(
        f"initialize_parameters: module {prefix.rstrip('.') or '<root>'} ({type(module).__name__}) owns tensors "
        f"{_direct_tensors(module)} but has no init rule; add its class to INIT_RULES in model/megatron/init.py"
    )


def _rule_tensors(module, prefix, local, layout: Layout, coords: RankCoords, config, seed, tied):
    """``{tensor name: {full-model name: full tensor (fp32)}}`` for the tensors ``module`` owns directly
    and that are in ``layout``: one full tensor each, or one per expert for a packed GroupedMLP weight."""
    rule = _rule_for(module, prefix)
    full = {}
    for name in _direct_tensors(module):
        key = prefix + name
        if key not in layout:  # non-persistent buffer, or a parameter megatron does not save
            continue
        if name not in rule:
            raise ValueError(
                f"initialize_parameters: {key} ({type(module).__name__}.{name}) has no init rule; "
                "add it to INIT_RULES in model/megatron/init.py"
            )
        full[name] = {}
        for full_name, local_slice, spec in local_entries(key, local[key], layout[key], coords):
            seed_name, fill = tied.get(key, (full_name, rule[name]))
            tensor = torch.empty(_full_shape(local_slice, spec, coords), dtype=torch.float32)
            torch.manual_seed(derived_seed(seed, seed_name))
            fill(tensor, config)
            full[name][full_name] = tensor
    return full


def _tied_names(model: nn.Module) -> dict[str, tuple[str, Fill]]:
    return _TIED if getattr(model, "share_embeddings_and_output_weights", False) else {}


def _full_shape(local: torch.Tensor, spec, coords: RankCoords) -> tuple[int, ...]:
    shape = list(local.shape)
    if spec.dim is not None:
        shape[spec.dim] *= coords.split(spec)[1]
    return tuple(shape)


def _copy_shard(local: torch.Tensor, full: dict[str, torch.Tensor], key: str, layout: Layout,
                coords: RankCoords) -> None:
    shard = shard_state_dict(full, {key: layout[key]}, coords)[key]
    if shard.shape != local.shape:
        shapes = [tuple(tensor.shape) for tensor in full.values()]
        raise ValueError(
            f"initialize_parameters: {key}: the slice of the full tensors {shapes} has shape "
            f"{tuple(shard.shape)}, the local tensor {tuple(local.shape)}; is its partition_dim tagged right?"
        )
    local.copy_(shard)
