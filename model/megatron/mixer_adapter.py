"""A registered mixer as megatron's self-attention submodule (``TransformerLayer.self_attention``).

Megatron passes ``(T, B, D)`` activations, sequence-sharded over TP ranks when sequence parallel is
on. The adapter gathers the sequence once, runs the mixer on ``(B, T, D)`` with
:class:`MegatronLinears` (heads split over TP ranks), and scatters the output back. Under context
parallelism (our LASP-2 sequence parallelism) each CP rank holds one contiguous chunk of every
sample and the mixer runs inside ``use_sequence_parallel`` over megatron's context-parallel group.

Selective recompute (``recompute_granularity="selective"`` with megatron's default module
``"core_attn"``) recomputes the whole sequence mixer, which is this layer's attention core: its
projections, convs and recurrence (or softmax attention) keep no activations, only their input, and
run again in the backward pass. The checkpoint is torch's non-reentrant one, so tensors a mixer
reads from outside (RWKV7's ``v_first``) keep their gradient path.
"""
from __future__ import annotations

import contextlib

import torch
import torch.utils.checkpoint
from megatron.core.transformer.module import MegatronModule

from linear_moe.model.megatron.linears import MegatronLinears
from linear_moe.model.mixers import MIXERS, SINGLE_DEVICE
from linear_moe.model.mixers.value_residual import current_value_residual, value_residual_scope
from linear_moe.model.parallel import SequenceParallelContext, use_sequence_parallel


class MixerAdapter(MegatronModule):
    """``forward(x_TBD, ...) -> (y_TBD, None)`` around ``MIXERS[mixer_name]``.

    Parameters of the mixer are tagged for megatron: per-head parameters (sized with
    ``local_heads``) get ``tensor_model_parallel``/``partition_dim`` like megatron's own sharded
    weights; every other non-megatron parameter is replicated over TP and gets
    ``sequence_parallel=True`` so ``finalize_model_grads`` sums its gradient over the TP group.
    """

    def __init__(self, config, layer_number: int, model_config, mixer_name: str, pg_collection=None, **unused):
        super().__init__(config=config)
        if mixer_name not in MIXERS:
            raise ValueError(f"mixer {mixer_name!r} is not registered; known mixers: {sorted(MIXERS)}")
        tp_size = config.tensor_model_parallel_size
        if tp_size > 1 and not config.sequence_parallel:
            raise ValueError(
                "MixerAdapter: tensor parallel > 1 needs sequence_parallel=True (transformer_config sets it)"
            )
        mixer_cls = MIXERS[mixer_name]
        self.layer_idx = layer_number - 1  # megatron numbers layers from 1, globally across stages
        self.mixer = mixer_cls(model_config, layer_idx=self.layer_idx, linears=MegatronLinears(config))
        with torch.device("meta"):
            reference = mixer_cls(model_config, layer_idx=self.layer_idx, linears=SINGLE_DEVICE)
        tag_mixer_parameters(self.mixer, dict(reference.named_parameters()), tp_size, config.sequence_parallel)
        self.sequence_parallel = SequenceParallelContext()
        if config.context_parallel_size > 1:
            from megatron.core import parallel_state

            self.sequence_parallel = SequenceParallelContext(parallel_state.get_context_parallel_group())
        self.recompute_mixer = (config.recompute_granularity == "selective"
                                and "core_attn" in (config.recompute_modules or ()))

    def forward(self, hidden_states, attention_mask=None, inference_context=None, rotary_pos_emb=None,
                packed_seq_params=None, **unused):
        """``hidden_states``: ``(T / tp, B, D)`` under sequence parallel, else ``(T, B, D)``."""
        from megatron.core import tensor_parallel

        x_TBD = hidden_states
        if self.config.sequence_parallel:
            x_TBD = tensor_parallel.gather_from_sequence_parallel_region(x_TBD, tensor_parallel_output_grad=True)
        elif self.config.tensor_model_parallel_size > 1:
            x_TBD = tensor_parallel.copy_to_tensor_model_parallel_region(x_TBD)
        cu_seqlens = None if packed_seq_params is None else packed_seq_params.cu_seqlens_q
        if self.recompute_mixer and torch.is_grad_enabled():
            y_BTD = torch.utils.checkpoint.checkpoint(self._run_mixer, x_TBD.transpose(0, 1), cu_seqlens,
                                                      current_value_residual(), use_reentrant=False)
        else:
            y_BTD = self._run_mixer(x_TBD.transpose(0, 1), cu_seqlens, current_value_residual())
        y_TBD = y_BTD.transpose(0, 1).contiguous()
        if self.config.sequence_parallel:
            y_TBD = tensor_parallel.scatter_to_sequence_parallel_region(y_TBD)
        return y_TBD, None

    def _run_mixer(self, x_BTD: torch.Tensor, cu_seqlens, value_residual) -> torch.Tensor:
        """The mixer on ``(B, T, D)``, under this layer's sequence parallelism and the forward's
        value-residual slot (the same ones again when selective recompute re-runs it)."""
        slot = contextlib.nullcontext() if value_residual is None else value_residual_scope(value_residual)
        with use_sequence_parallel(self.sequence_parallel), slot:
            return self.mixer(x_BTD, cu_seqlens=cu_seqlens)[0]

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """Declare TP-split mixer parameters as sharded on their ``partition_dim``, so dist
        checkpoints reshard them between layouts (megatron would otherwise save them as replicated)."""
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        state = self.mixer.state_dict(prefix="", keep_vars=True)
        params = dict(self.mixer.named_parameters())
        split_axis = {name: params[name].partition_dim for name in state
                      if name in params and getattr(params[name], "tensor_model_parallel", False)}
        return make_sharded_tensors_for_checkpoint(state, f"{prefix}mixer.", split_axis, sharded_offsets)


def tag_mixer_parameters(mixer: torch.nn.Module, full_params: dict, tp_size: int, sequence_parallel: bool) -> None:
    """Set megatron's TP attributes on a mixer's parameters by comparing with a single-device build.

    ``full_params``: name -> parameter of the same mixer built with ``tp_size=1`` (on meta).
    A parameter whose shape differs in exactly one dim by the factor ``tp_size`` is TP-sharded on
    that dim; one of equal shape is replicated. Anything else raises ``ValueError``.
    """
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    for name, param in mixer.named_parameters():
        if hasattr(param, "tensor_model_parallel"):  # megatron column/row linears tag their own
            continue
        if name not in full_params:
            raise ValueError(f"mixer parameter {name!r} does not exist in the single-device build of the mixer")
        full_shape, local_shape = tuple(full_params[name].shape), tuple(param.shape)
        if full_shape == local_shape:
            set_tensor_model_parallel_attributes(param, False, -1, 1)
            param.sequence_parallel = sequence_parallel
            continue
        split_dims = [d for d, (f, l) in enumerate(zip(full_shape, local_shape)) if f != l]
        if (len(full_shape) != len(local_shape) or len(split_dims) != 1
                or full_shape[split_dims[0]] != local_shape[split_dims[0]] * tp_size):
            raise ValueError(
                f"mixer parameter {name!r}: local shape {local_shape} is not full shape {full_shape} split "
                f"along one dim over tensor parallel {tp_size}; size per-head parameters with linears.local_heads"
            )
        set_tensor_model_parallel_attributes(param, True, split_dims[0], 1)
