"""Evaluate step: lm-eval on the converted model over a built-in held-out task suite (and standard
tasks by name), plus a Markdown table, flat metrics, plots and one self-contained HTML report.

Entry function :func:`evaluate` (``core.py``); the CLI is ``python -m linear_moe.components.evaluate``,
the KFP component lives in ``kfp_component.py``. Imports here stay light (no torch, no lm-eval).
"""
from linear_moe.components.evaluate.core import EvaluateResult, evaluate, parse_tasks
from linear_moe.components.evaluate.tasks import BUILTIN

__all__ = ["BUILTIN", "EvaluateResult", "evaluate", "parse_tasks"]
