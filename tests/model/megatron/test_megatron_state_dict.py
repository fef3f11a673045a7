"""Full <-> sharded state dicts: sharding then merging is the identity, and shards are the right slices.

Grouped-GEMM ranks (GroupedMLP's packed ``experts.weight1``/``weight2``) share the per-expert full dict."""
import pytest
import torch

from linear_moe.model.megatron.state_dict import (
    RankCoords,
    ShardSpec,
    global_key,
    merge_shards,
    pack_experts,
    shard_state_dict,
    unpack_experts,
)

D, F, V, E = 4, 6, 8, 4  # hidden, MLP width, vocab, experts

# A 4-layer model's full tensors (as the TP=PP=EP=1 model would name them).
FULL_SPECS = {
    "embedding.word_embeddings.weight": ((V, D), ShardSpec(dim=0)),
    "decoder.final_layernorm.weight": ((D,), ShardSpec()),
    "output_layer.weight": ((V, D), ShardSpec(dim=0)),
}
for layer in range(4):
    FULL_SPECS.update({
        f"decoder.layers.{layer}.self_attention.mixer.q_proj.weight": ((D, D), ShardSpec(dim=0)),
        f"decoder.layers.{layer}.self_attention.mixer.A_log": ((D,), ShardSpec(dim=0)),
        f"decoder.layers.{layer}.self_attention.mixer.o_proj.weight": ((D, D), ShardSpec(dim=1)),
        f"decoder.layers.{layer}.mlp.router.weight": ((E, D), ShardSpec()),
    })
    for expert in range(E):
        prefix = f"decoder.layers.{layer}.mlp.experts.local_experts.{expert}"
        FULL_SPECS[f"{prefix}.linear_fc1.weight"] = ((2 * F, D), ShardSpec(dim=0, expert=True, glu=True))
        FULL_SPECS[f"{prefix}.linear_fc2.weight"] = ((D, F), ShardSpec(dim=1, expert=True))


def full_state():
    generator = torch.Generator().manual_seed(0)
    return {name: torch.randn(shape, generator=generator) for name, (shape, _) in FULL_SPECS.items()}


def rank_layouts(tp, pp, ep, etp):
    """(coords, local layout) of every rank; local keys use stage-local layer and expert indices."""
    layers, experts = 4 // pp, E // ep
    ranks = []
    for p in range(pp):
        for t in range(tp):
            for e in range(ep):
                for et in range(etp):
                    coords = RankCoords(tensor_rank=t, tensor_size=tp, expert_tensor_rank=et, expert_tensor_size=etp,
                                        layer_offset=p * layers, expert_offset=e * experts)
                    layout = {}
                    for name, (_, spec) in FULL_SPECS.items():
                        parts = name.split(".")
                        if name.startswith("decoder.layers."):
                            layer = int(parts[2])
                            if not p * layers <= layer < (p + 1) * layers:
                                continue
                            parts[2] = str(layer - p * layers)
                            if spec.expert:
                                expert = int(parts[6])
                                if not e * experts <= expert < (e + 1) * experts:
                                    continue
                                parts[6] = str(expert - e * experts)
                        elif name.startswith("embedding") and p != 0:
                            continue  # the embedding lives on the first stage
                        elif not name.startswith("embedding") and p != pp - 1:
                            continue  # final norm and output layer live on the last stage
                        layout[".".join(parts)] = spec
                    ranks.append((coords, layout))
    return ranks


def grouped_layout(layout, experts):
    """A rank's layout with GroupedMLP experts: each layer's ``local_experts.*`` keys become the packed
    ``experts.weight1``/``weight2`` (specs of one expert's fc1/fc2, ``packed_experts=experts``)."""
    grouped = {}
    for key, spec in layout.items():
        if ".local_experts." not in key:
            grouped[key] = spec
        else:
            prefix, fc = key.split("local_experts.")[0], key.split(".linear_fc")[1][0]
            grouped[f"{prefix}weight{fc}"] = ShardSpec(dim=spec.dim, expert=True, glu=spec.glu, packed_experts=experts)
    return grouped


@pytest.mark.parametrize("grouped", [False, True], ids=["sequential", "grouped"])
@pytest.mark.parametrize("tp, pp, ep, etp", [(2, 1, 1, 2), (1, 2, 1, 1), (1, 1, 2, 1), (2, 2, 2, 1), (2, 1, 2, 2)],
                         ids=lambda v: str(v))
def test_shard_then_merge_is_identity(tp, pp, ep, etp, grouped):
    full = full_state()
    ranks = [(coords, grouped_layout(layout, E // ep) if grouped else layout)
             for coords, layout in rank_layouts(tp, pp, ep, etp)]
    shards = [(coords, shard_state_dict(full, layout, coords), layout) for coords, layout in ranks]
    merged = merge_shards(shards)
    assert set(merged) == set(full)
    for name in full:
        assert torch.equal(merged[name], full[name]), name


def test_packed_weights_are_what_grouped_mlp_forward_views():
    """GroupedMLP.forward multiplies by ``weight1.view(E, D, -1)[e]`` (then chunks [gate | up] on the last
    dim) and ``weight2.view(E, -1, D)[e]``: the transposes of expert e's TP slices of fc1 and fc2."""
    full = full_state()
    coords = RankCoords(expert_tensor_rank=1, expert_tensor_size=2, layer_offset=2, expert_offset=2)
    specs = {"decoder.layers.1.mlp.experts.weight1": ShardSpec(dim=0, expert=True, glu=True, packed_experts=2),
             "decoder.layers.1.mlp.experts.weight2": ShardSpec(dim=1, expert=True, packed_experts=2)}
    local = shard_state_dict(full, specs, coords)
    assert local["decoder.layers.1.mlp.experts.weight1"].shape == (D, 2 * 2 * F // 2)
    assert local["decoder.layers.1.mlp.experts.weight2"].shape == (2 * F // 2, D)
    w1 = local["decoder.layers.1.mlp.experts.weight1"].view(2, D, -1)
    w2 = local["decoder.layers.1.mlp.experts.weight2"].view(2, -1, D)
    for i in range(2):
        fc1 = full[f"decoder.layers.3.mlp.experts.local_experts.{2 + i}.linear_fc1.weight"]
        fc2 = full[f"decoder.layers.3.mlp.experts.local_experts.{2 + i}.linear_fc2.weight"]
        gate, up = w1[i].chunk(2, dim=-1)
        assert torch.equal(gate, fc1[F // 2:F].t()) and torch.equal(up, fc1[F + F // 2:].t())
        assert torch.equal(w2[i], fc2[:, F // 2:].t())


def test_pack_then_unpack_is_identity():
    experts = [torch.randn(2 * F, D) for _ in range(3)]
    packed = pack_experts("decoder.layers.0.mlp.experts.weight1", experts)
    assert packed.shape == (D, 3 * 2 * F)
    unpacked = unpack_experts("decoder.layers.0.mlp.experts.weight1", packed, 3)
    assert all(torch.equal(a, b) for a, b in zip(experts, unpacked))
    with pytest.raises(ValueError, match="not a GroupedMLP"):
        pack_experts("decoder.layers.0.mlp.linear_fc1.weight", experts)


def test_shards_are_the_expected_slices():
    full = full_state()
    name = "decoder.layers.3.mlp.experts.local_experts.2.linear_fc1.weight"
    gate, up = full[name][:F], full[name][F:]
    coords = RankCoords(tensor_rank=1, tensor_size=2, expert_tensor_rank=1, expert_tensor_size=2,
                        layer_offset=2, expert_offset=2)
    local_key = "decoder.layers.1.mlp.experts.local_experts.0.linear_fc1.weight"
    q_key = "decoder.layers.1.self_attention.mixer.q_proj.weight"
    o_key = "decoder.layers.1.self_attention.mixer.o_proj.weight"
    local = shard_state_dict(full, {local_key: FULL_SPECS[name][1], q_key: ShardSpec(dim=0), o_key: ShardSpec(dim=1)}, coords)
    # rank 1 of a gated fc1 holds the second half of the gate rows, then the second half of the up rows
    assert torch.equal(local[local_key], torch.cat([gate[F // 2:], up[F // 2:]]))
    assert torch.equal(local[q_key], full["decoder.layers.3.self_attention.mixer.q_proj.weight"][D // 2:])
    assert torch.equal(local[o_key], full["decoder.layers.3.self_attention.mixer.o_proj.weight"][:, D // 2:])


def test_global_key_shifts_layer_and_expert_indices():
    coords = RankCoords(layer_offset=6, expert_offset=8)
    assert global_key("decoder.layers.1.mlp.experts.local_experts.3.linear_fc2.weight", coords) == \
        "decoder.layers.7.mlp.experts.local_experts.11.linear_fc2.weight"
    assert global_key("decoder.layers.0.mlp.experts.linear_fc1.weight2", coords) == \
        "decoder.layers.6.mlp.experts.linear_fc1.weight10"
    assert global_key("output_layer.weight", coords) == "output_layer.weight"


def test_tied_output_layer_comes_from_the_embedding():
    full = {"embedding.word_embeddings.weight": torch.randn(V, D)}
    local = shard_state_dict(full, {"output_layer.weight": ShardSpec(dim=0)}, RankCoords(tensor_rank=1, tensor_size=2))
    assert torch.equal(local["output_layer.weight"], full["embedding.word_embeddings.weight"][V // 2:])


def test_missing_shard_and_bad_split_raise():
    full = full_state()
    (coords0, layout0), _ = rank_layouts(2, 1, 1, 2)[:2]
    with pytest.raises(ValueError, match=r"shards of ranks \[1\] \(of 2\) are missing"):
        merge_shards([(coords0, shard_state_dict(full, layout0, coords0), layout0)])
    with pytest.raises(ValueError, match="does not split into 3 shards"):
        shard_state_dict({"output_layer.weight": torch.randn(V, D)}, {"output_layer.weight": ShardSpec(dim=0)},
                         RankCoords(tensor_size=3))
    with pytest.raises(ValueError, match="full state dict has no 'decoder.layers.9"):
        shard_state_dict(full, {"decoder.layers.9.mlp.router.weight": ShardSpec()}, RankCoords())
