"""Tokenize step: raw text corpus -> byte-level BPE tokenizer + Megatron indexed dataset.

Entry function :func:`tokenize` (``core.py``); the CLI is ``python -m linear_moe.components.tokenize``,
the KFP component lives in ``kfp_component.py``. Imports here stay light: worker processes are
spawned and re-import this package.
"""
from linear_moe.components.tokenize.core import SPLITS, TokenizeResult, split_prefix, tokenize

__all__ = ["SPLITS", "TokenizeResult", "split_prefix", "tokenize"]
