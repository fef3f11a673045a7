"""Megatron <-> Hugging Face state-dict names of the Linear-MoE model (a torchtitan-style adapter).

Both sides are *full* state dicts: megatron's is ``model.state_dict()`` of the model built with
TP = PP = EP = 1 (``_extra_state`` entries dropped), Hugging Face's is ``LinearMoEForCausalLM``'s.
Every tensor is covered by exactly one :data:`RULES` entry; a name no rule matches raises.

Patterns use ``{i}`` (layer), ``{e}`` (routed expert, megatron side only) and ``{rest}`` (a mixer's
own submodule path, identical on both sides because the mixers are the same modules).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch

_PLACEHOLDERS = {"i": r"(?P<i>\d+)", "e": r"(?P<e>\d+)", "rest": r"(?P<rest>.+)"}


def _compile(pattern: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", pattern)  # literal, name, literal, name, ...
    return re.compile("".join(re.escape(p) if k % 2 == 0 else _PLACEHOLDERS[p] for k, p in enumerate(parts)) + "$")


Tensors = list[torch.Tensor]


@dataclass(frozen=True)
class Rule:
    """``mcore`` patterns <-> ``hf`` patterns; ``to_hf``/``to_mcore`` map one group's tensors, in pattern order.

    ``per_expert``: the megatron patterns carry ``{e}``; their slots hold one tensor per expert
    (a list ordered by expert index) and the Hugging Face tensors are stacked over experts.
    """

    mcore: tuple[str, ...]
    hf: tuple[str, ...]
    to_hf: Callable[[list], Tensors]
    to_mcore: Callable[[Tensors], list]
    per_expert: bool = False


def _identity(tensors):
    return list(tensors)


def rename(mcore: str, hf: str) -> Rule:
    """Same tensor, another name."""
    return Rule((mcore,), (hf,), _identity, _identity)


def glu_split(mcore: str, hf_gate: str, hf_up: str) -> Rule:
    """Megatron's fused SwiGLU ``linear_fc1`` ``(2F, D) = [gate; up]`` <-> ``gate_proj``, ``up_proj`` ``(F, D)``."""
    return Rule(
        (mcore,), (hf_gate, hf_up),
        to_hf=lambda ts: [t.contiguous() for t in ts[0].chunk(2, dim=0)],
        to_mcore=lambda ts: [torch.cat(ts, dim=0)],
    )


def _experts_to_hf(slots: list[Tensors]) -> Tensors:
    fc1_list, fc2_list = slots  # per expert: fc1 (2F, D), fc2 (D, F)
    gate_EDF = torch.stack([w.chunk(2, dim=0)[0].t() for w in fc1_list]).contiguous()
    up_EDF = torch.stack([w.chunk(2, dim=0)[1].t() for w in fc1_list]).contiguous()
    down_EFD = torch.stack([w.t() for w in fc2_list]).contiguous()
    return [gate_EDF, up_EDF, down_EFD]


def _experts_to_mcore(tensors: Tensors) -> list[Tensors]:
    gate_EDF, up_EDF, down_EFD = tensors
    fc1 = [torch.cat([g.t(), u.t()], dim=0).contiguous() for g, u in zip(gate_EDF, up_EDF)]
    fc2 = [d.t().contiguous() for d in down_EFD]
    return [fc1, fc2]


def expert_stack(mcore_fc1: str, mcore_fc2: str, hf_gate: str, hf_up: str, hf_down: str) -> Rule:
    """Megatron's per-expert ``linear_fc1`` ``(2F, D)`` / ``linear_fc2`` ``(D, F)`` <-> stacked
    ``gate_EDF``/``up_EDF`` ``(E, D, F)`` and ``down_EFD`` ``(E, F, D)`` (``y = x @ W``, hence the transposes)."""
    return Rule((mcore_fc1, mcore_fc2), (hf_gate, hf_up, hf_down), _experts_to_hf, _experts_to_mcore, per_expert=True)


_M = "decoder.layers.{i}."
_H = "model.layers.{i}."

RULES: tuple[Rule, ...] = (
    rename("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
    rename("decoder.final_layernorm.weight", "model.norm.weight"),
    rename("output_layer.weight", "lm_head.weight"),
    rename(_M + "input_layernorm.weight", _H + "mixer_norm.weight"),
    rename(_M + "pre_mlp_layernorm.weight", _H + "ffn_norm.weight"),
    rename(_M + "self_attention.mixer.{rest}", _H + "mixer.{rest}"),
    # dense SwiGLU layers
    glu_split(_M + "mlp.linear_fc1.weight", _H + "ffn.gate_proj.weight", _H + "ffn.up_proj.weight"),
    rename(_M + "mlp.linear_fc2.weight", _H + "ffn.down_proj.weight"),
    # MoE layers: router, routed experts, shared experts and their gate
    rename(_M + "mlp.router.weight", _H + "ffn.router.weight"),
    rename(_M + "mlp.router.expert_bias", _H + "ffn.router.expert_bias_E"),
    expert_stack(_M + "mlp.experts.local_experts.{e}.linear_fc1.weight",
                 _M + "mlp.experts.local_experts.{e}.linear_fc2.weight",
                 _H + "ffn.experts.gate_EDF", _H + "ffn.experts.up_EDF", _H + "ffn.experts.down_EFD"),
    glu_split(_M + "mlp.shared_experts.linear_fc1.weight",
              _H + "ffn.shared_experts.gate_proj.weight", _H + "ffn.shared_experts.up_proj.weight"),
    rename(_M + "mlp.shared_experts.linear_fc2.weight", _H + "ffn.shared_experts.down_proj.weight"),
    rename(_M + "mlp.shared_experts.gate_weight", _H + "ffn.shared_expert_gate.weight"),
)


def _convert(source: dict[str, torch.Tensor], side: str) -> dict[str, torch.Tensor]:
    """Group ``source`` keys by (rule, placeholder values), convert each group, name the results."""
    target_side = "hf" if side == "mcore" else "mcore"
    compiled = [[_compile(p) for p in getattr(rule, side)] for rule in RULES]
    groups: dict[tuple[int, tuple], dict[int, object]] = {}
    for key, tensor in source.items():
        hit = next(((r, s, m) for r, patterns in enumerate(compiled) for s, pattern in enumerate(patterns)
                    if (m := pattern.match(key))), None)
        if hit is None:
            raise ValueError(f"{side} tensor {key!r} matches no rule in linear_moe.components.convert.adapter.RULES; "
                             "add a rule for it (is the checkpoint from another model?)")
        r, slot, match = hit
        names = {k: v for k, v in match.groupdict().items() if k != "e"}
        slots = groups.setdefault((r, tuple(sorted(names.items()))), {})
        if side == "mcore" and RULES[r].per_expert:
            slots.setdefault(slot, {})[int(match["e"])] = tensor
        else:
            slots[slot] = tensor
    out: dict[str, torch.Tensor] = {}
    for (r, names_items), slots in groups.items():
        rule, names = RULES[r], dict(names_items)
        patterns = getattr(rule, side)
        missing = [p.format(**names, e="*") for s, p in enumerate(patterns) if s not in slots]
        if missing:
            raise ValueError(f"{side} state dict is missing {missing} (needed with "
                             f"{[p.format(**names, e='*') for p in patterns]})")
        inputs = [slots[s] for s in range(len(patterns))]
        if side == "mcore" and rule.per_expert:
            inputs = [_by_expert(slot, patterns[s].format(**names, e="{e}")) for s, slot in enumerate(inputs)]
        results = (rule.to_hf if side == "mcore" else rule.to_mcore)(inputs)
        for pattern, result in zip(getattr(rule, target_side), results):
            if isinstance(result, list):  # per-expert megatron tensors
                out.update({pattern.format(**names, e=e): t for e, t in enumerate(result)})
            else:
                out[pattern.format(**names)] = result
    return out


def _by_expert(tensors_by_e: dict[int, torch.Tensor], pattern: str) -> Tensors:
    expected = list(range(len(tensors_by_e)))
    if sorted(tensors_by_e) != expected:
        raise ValueError(f"expert indices of {pattern!r} are {sorted(tensors_by_e)}, expected 0..{len(expected) - 1}")
    return [tensors_by_e[e] for e in expected]


def mcore_to_hf(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full megatron state dict (tensors only) -> ``LinearMoEForCausalLM`` state dict."""
    return _convert(state_dict, "mcore")


def hf_to_mcore(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``LinearMoEForCausalLM`` state dict -> full megatron state dict (tensors only)."""
    return _convert(state_dict, "hf")


def check_names_and_shapes(expected: dict[str, torch.Size], actual: dict[str, torch.Tensor], what: str) -> None:
    """Raise ``ValueError`` naming every missing, unexpected or mis-shaped tensor of ``actual``."""
    problems = [f"missing {k!r} {tuple(s)}" for k, s in expected.items() if k not in actual]
    problems += [f"unexpected {k!r} {tuple(t.shape)}" for k, t in actual.items() if k not in expected]
    problems += [f"{k!r} has shape {tuple(t.shape)}, the config expects {tuple(expected[k])}"
                 for k, t in actual.items() if k in expected and tuple(t.shape) != tuple(expected[k])]
    if problems:
        shown = "; ".join(problems[:8]) + (f"; ... ({len(problems) - 8} more)" if len(problems) > 8 else "")
        raise ValueError(f"{what}: the weights do not match the model config: {shown}")
