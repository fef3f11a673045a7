"""Convert step: megatron dist checkpoint (any TP/PP/EP layout) <-> Hugging Face ``LinearMoEForCausalLM``.

Entry functions :func:`convert` (megatron -> HF) and :func:`hf_to_megatron` (``core.py``); the CLI is
``python -m linear_moe.components.convert``, the KFP component lives in ``kfp_component.py``, the name
mapping in ``adapter.py``.
"""
from linear_moe.components.convert.core import DIRECTIONS, convert, hf_to_megatron

__all__ = ["DIRECTIONS", "convert", "hf_to_megatron"]
