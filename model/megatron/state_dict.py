"""Full <-> sharded state dicts of the megatron model, for tensor, expert and pipeline parallelism.

The *full* state dict is the one of the same model built with TP = PP = EP = 1 (global layer and
expert indices). A rank's *local* state dict is ``model.state_dict()`` on that rank. The mapping
between them needs, per local key, a :class:`ShardSpec` (read off megatron's parameter attributes by
:func:`shard_layout`) and the rank's :class:`RankCoords`. :func:`shard_state_dict` cuts a full dict
for one rank; :func:`merge_shards` rebuilds the full dict from every rank's dict (offline, e.g. the
checkpoint converter); :func:`gather_full_state_dict` does the latter with collectives.

Routed experts have one full layout whichever expert module holds them: megatron's per-expert
``SequentialMLP`` names (``experts.local_experts.<e>.linear_fc1.weight`` ``(2F, D)`` = [gate; up],
``linear_fc2.weight`` ``(D, F)``). The grouped-GEMM ``GroupedMLP`` packs a rank's experts into two
tensors (``experts.weight1`` ``(D, E_local * 2F)``, ``experts.weight2`` ``(E_local * F, D)``); its
ShardSpec says how many (``packed_experts``) and :func:`local_entries` unpacks them, so a grouped
model and a per-expert one have the same full state dict (as in megatron's own dist checkpoints).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

import torch

_LAYER_RE = re.compile(r"^(decoder\.layers\.)(\d+)(\..*)$")
#: local expert index in SequentialMLP (``experts.local_experts.<i>.``) and grouped GEMM (``weight<i>``)
_EXPERT_RES = (
    re.compile(r"^(.*\.experts\.local_experts\.)(\d+)(\..*)$"),
    re.compile(r"^(.*\.experts\.linear_fc[12]\.(?:weight|bias))(\d+)()$"),
)
_GLU_RE = re.compile(r"\.linear_fc1\.(?:weight|bias)\d*$")
#: GroupedMLP's packed expert weights: ``<prefix>experts.weight1`` (fc1) and ``weight2`` (fc2)
_PACKED_RE = re.compile(r"^(.*\.experts\.)weight([12])$")
_TIED_OUTPUT = ("output_layer.weight", "embedding.word_embeddings.weight")


@dataclass(frozen=True)
class ShardSpec:
    """How one local tensor relates to its full tensor."""

    dim: int | None = None  # dim split over the (expert-)tensor-parallel group; None = replicated
    expert: bool = False  # a routed expert's tensor: split over expert-tensor ranks, index shifted by EP
    glu: bool = False  # fc1 of a gated MLP: the [gate; up] halves are split separately
    packed_experts: int = 0  # GroupedMLP weight1/2: the local experts it packs; the fields above are one expert's


@dataclass(frozen=True)
class RankCoords:
    """Where a rank sits in the layout, as far as its state dict is concerned."""

    tensor_rank: int = 0
    tensor_size: int = 1
    expert_tensor_rank: int = 0
    expert_tensor_size: int = 1
    layer_offset: int = 0  # global index of this pipeline stage's first layer
    expert_offset: int = 0  # global index of this expert-parallel rank's first expert

    def split(self, spec: ShardSpec) -> tuple[int, int]:
        """``(rank, size)`` of the group that ``spec``'s tensor is split over."""
        if spec.expert:
            return self.expert_tensor_rank, self.expert_tensor_size
        return self.tensor_rank, self.tensor_size

    @classmethod
    def current(cls, num_layers: int, num_experts: int | None = None) -> "RankCoords":
        """This rank's coordinates from megatron's initialised parallel state."""
        from megatron.core import parallel_state as ps

        pp_size, ep_size = ps.get_pipeline_model_parallel_world_size(), ps.get_expert_model_parallel_world_size()
        return cls(
            tensor_rank=ps.get_tensor_model_parallel_rank(),
            tensor_size=ps.get_tensor_model_parallel_world_size(),
            expert_tensor_rank=ps.get_expert_tensor_parallel_rank(),
            expert_tensor_size=ps.get_expert_tensor_parallel_world_size(),
            layer_offset=ps.get_pipeline_model_parallel_rank() * (num_layers // pp_size),
            expert_offset=ps.get_expert_model_parallel_rank() * ((num_experts or 0) // ep_size),
        )


def shard_layout(model: torch.nn.Module, gated_linear_unit: bool = True) -> dict[str, ShardSpec]:
    """ShardSpec for every tensor entry of ``model.state_dict()`` (``_extra_state`` entries skipped).

    Split dims come from megatron's ``tensor_model_parallel``/``partition_dim`` parameter attributes
    (the mixer adapter sets them on per-head parameters too); buffers are replicated. A GroupedMLP's
    ``weight1``/``weight2`` get the spec of one expert's ``linear_fc1``/``linear_fc2`` and ``packed_experts``.
    """
    from megatron.core.transformer.moe.experts import GroupedMLP

    params = dict(model.named_parameters())
    packed = {f"{name}.weight{n}": module.num_local_experts
              for name, module in model.named_modules() if isinstance(module, GroupedMLP) for n in (1, 2)}
    layout = {}
    for key, value in model.state_dict().items():
        if not isinstance(value, torch.Tensor):
            continue
        if key in packed:
            fc1 = key.endswith("1")
            layout[key] = ShardSpec(dim=0 if fc1 else 1, expert=True, glu=fc1 and gated_linear_unit,
                                    packed_experts=packed[key])
            continue
        param = params.get(key)
        split = param is not None and getattr(param, "tensor_model_parallel", False)
        dim = param.partition_dim if split else None
        glu = gated_linear_unit and dim == 0 and bool(_GLU_RE.search(key))
        layout[key] = ShardSpec(dim=dim, expert=".experts." in key, glu=glu)
    return layout


def global_key(local_key: str, coords: RankCoords) -> str:
    """Rename a local key to the full model's: global layer index, global expert index."""
    match = _LAYER_RE.match(local_key)
    if match:
        local_key = f"{match[1]}{int(match[2]) + coords.layer_offset}{match[3]}"
    for pattern in _EXPERT_RES:
        match = pattern.match(local_key)
        if match:
            return f"{match[1]}{int(match[2]) + coords.expert_offset}{match[3]}"
    return local_key


def _packed_key_parts(key: str) -> tuple[str, str]:
    match = _PACKED_RE.match(key)
    if match is None:
        raise ValueError(f"{key}: ShardSpec.packed_experts is set but the key is not a GroupedMLP "
                         "'<prefix>experts.weight1' or 'weight2'")
    return match[1], match[2]


def unpack_experts(key: str, packed: torch.Tensor, num_experts: int) -> list[torch.Tensor]:
    """GroupedMLP ``weight1``/``weight2`` -> one (view) tensor per local expert, oriented like
    SequentialMLP's ``linear_fc1`` ``(2F, D)`` / ``linear_fc2`` ``(D, F)`` (of this rank's TP slice).

    Uses GroupedMLP.forward's views: ``weight1.view(E, D, -1)`` (columns [gate | up] per expert) and
    ``weight2.view(E, -1, D)``; each expert's matrix is the transpose of the nn.Linear weight.
    """
    _, fc = _packed_key_parts(key)
    if fc == "1":
        per_expert = packed.view(num_experts, packed.shape[0], -1)  # (E, D, 2F)
    else:
        per_expert = packed.view(num_experts, -1, packed.shape[1])  # (E, F, D)
    return [matrix.t() for matrix in per_expert]


def pack_experts(key: str, experts: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`unpack_experts`: per-expert ``linear_fc1``/``linear_fc2`` -> ``weight1``/``weight2``."""
    _, fc = _packed_key_parts(key)
    stacked = torch.stack([weight.t() for weight in experts])  # (E, D, 2F) | (E, F, D), contiguous
    return stacked.reshape(stacked.shape[1], -1) if fc == "1" else stacked.reshape(-1, stacked.shape[2])


def _expert_spec(spec: ShardSpec) -> ShardSpec:
    return ShardSpec(dim=spec.dim, expert=spec.expert, glu=spec.glu)


def _packed_names(key: str, spec: ShardSpec, coords: RankCoords) -> list[str]:
    prefix, fc = _packed_key_parts(key)
    return [global_key(f"{prefix}local_experts.{i}.linear_fc{fc}.weight", coords) for i in range(spec.packed_experts)]


def local_entries(key: str, tensor: torch.Tensor, spec: ShardSpec,
                  coords: RankCoords) -> list[tuple[str, torch.Tensor, ShardSpec]]:
    """``(full name, this rank's slice, its ShardSpec)`` of a local tensor: itself under
    :func:`global_key`, or, for a GroupedMLP packed weight, one entry per local expert."""
    if not spec.packed_experts:
        return [(global_key(key, coords), tensor, spec)]
    experts = unpack_experts(key, tensor, spec.packed_experts)
    return list(zip(_packed_names(key, spec, coords), experts, [_expert_spec(spec)] * len(experts)))


def _take_shard(full: torch.Tensor, spec: ShardSpec, rank: int, size: int, key: str) -> torch.Tensor:
    if spec.dim is None or size == 1:
        return full.clone()
    parts = full.chunk(2, spec.dim) if spec.glu else (full,)
    for part in parts:
        if part.shape[spec.dim] % size:
            raise ValueError(f"{key}: dim {spec.dim} of shape {tuple(full.shape)} does not split into {size} shards")
    return torch.cat([part.chunk(size, spec.dim)[rank] for part in parts], spec.dim).clone()


StateDict = dict[str, torch.Tensor]
Layout = dict[str, ShardSpec]


def shard_state_dict(full: StateDict, layout: Layout, coords: RankCoords) -> StateDict:
    """Cut this rank's local state dict (keys of ``layout``) out of the full one."""
    local = {}
    for key, spec in layout.items():
        rank, size = coords.split(spec)
        if spec.packed_experts:
            experts = [_take_shard(_full_tensor(full, name, key), spec, rank, size, name)
                       for name in _packed_names(key, spec, coords)]
            local[key] = pack_experts(key, experts)
        else:
            local[key] = _take_shard(_full_tensor(full, global_key(key, coords), key), spec, rank, size, key)
    return local


def _full_tensor(full: StateDict, name: str, key: str) -> torch.Tensor:
    if name not in full and name == _TIED_OUTPUT[0] and _TIED_OUTPUT[1] in full:
        name = _TIED_OUTPUT[1]  # tied embeddings: the last stage's copy of the embedding
    if name not in full:
        raise ValueError(
            f"full state dict has no {name!r} (needed for local key {key!r}); "
            "was it built from the same ModelConfig?"
        )
    return full[name]


def merge_shards(shards: Iterable[tuple[RankCoords, StateDict, Layout]]) -> StateDict:
    """Rebuild the full state dict from ``(coords, local_state_dict, layout)`` of every rank.

    Keys of each local dict that are missing from its layout raise; replicated tensors are taken
    from the first rank that has them. GroupedMLP weights come back as per-expert tensors.
    """
    pieces: dict[str, tuple[ShardSpec, int, dict[int, torch.Tensor]]] = {}
    for coords, local, layout in shards:
        for key, tensor in local.items():
            if key not in layout:
                raise ValueError(f"local key {key!r} has no ShardSpec; build the layout with shard_layout(model)")
            for name, piece, spec in local_entries(key, tensor, layout[key], coords):
                rank, size = coords.split(spec)
                if spec.dim is None:
                    rank, size = 0, 1
                entry = pieces.setdefault(name, (spec, size, {}))
                entry[2].setdefault(rank, piece)
    full = {}
    for name, (spec, size, by_rank) in pieces.items():
        missing = sorted(set(range(size)) - set(by_rank))
        if missing:
            raise ValueError(f"{name}: shards of ranks {missing} (of {size}) are missing")
        ordered = [by_rank[r] for r in range(size)]
        if size == 1:
            full[name] = ordered[0].contiguous()  # an unpacked GroupedMLP expert is a transposed view
        elif spec.glu:
            halves = [part.chunk(2, spec.dim) for part in ordered]
            full[name] = torch.cat([h[0] for h in halves] + [h[1] for h in halves], spec.dim)
        else:
            full[name] = torch.cat(ordered, spec.dim)
    return full


def gather_full_state_dict(local: StateDict, layout: Layout, coords: RankCoords, group=None) -> StateDict:
    """Every rank's ``local`` gathered (``all_gather_object``) and merged into the full dict, on every rank."""
    payload = (coords, {k: v.detach().cpu() for k, v in local.items()}, layout)
    gathered = [None] * torch.distributed.get_world_size(group)
    torch.distributed.all_gather_object(gathered, payload, group=group)
    return merge_shards(gathered)
