"""Run lm-eval on a loaded model: the built-in suite from ``tasks_dir`` plus standard tasks by name.

Offline by default (``HF_DATASETS_OFFLINE=1``, ``HF_HUB_OFFLINE=1`` unless already set): a
standard task (piqa, hellaswag, arc_easy, ...) runs only when its dataset is in the local Hugging
Face datasets cache; otherwise :func:`make_task_manager` raises a ``ValueError`` naming the task,
before the model runs.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path


NOT_METRICS = ("sample_len",)  # numeric entries of lm-eval's per-task results that are counts, not metrics


def _offline_env() -> None:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("DISABLE_MULTIPROC", "1")  # lm-eval's bootstrap stderr: no process pool


def make_task_manager(tasks_dir: Path, standard_tasks: Sequence[str], include_defaults: bool | None = None):
    """A ``TaskManager`` over ``tasks_dir`` (and lm-eval's own tasks if ``include_defaults``;
    ``None`` = only when standard tasks are requested: that index takes seconds to build).
    Checks every standard task's name and that its data loads."""
    from lm_eval.tasks import TaskManager

    if include_defaults is None:
        include_defaults = bool(standard_tasks)
    manager = TaskManager(include_path=str(tasks_dir), include_defaults=include_defaults)
    for name in standard_tasks:
        if name not in manager.all_tasks:
            raise ValueError(f"task {name!r}: not an lm-eval task, group or tag "
                             "(list them with `lm-eval ls tasks`)")
        try:
            manager.load([name])
        except Exception as err:  # datasets raises many types for a missing offline dataset
            raise ValueError(
                f"task {name!r}: its dataset is not available offline ({type(err).__name__}: {err}). "
                "Download it once into the Hugging Face datasets cache (HF_DATASETS_CACHE) on a machine "
                "with network, or drop the task from `tasks`"
            ) from err
    return manager


def run_lm_eval(model, tokenizer, tasks: Sequence[str], task_manager, *, batch_size: int = 8,
                limit: int | float | None = None, seed: int = 1234, max_length: int | None = None,
                bootstrap_iters: int = 100000) -> dict:
    """``lm_eval.simple_evaluate`` of ``model`` on ``tasks``; returns lm-eval's results dict
    (``results``, ``configs``, ``versions``, ``n-shot``, ``higher-is-better``, ``n-samples``, ...)
    without per-sample logs. ``task_manager``: the :func:`make_task_manager` built (and so checked)
    for these tasks. ``max_length=None`` uses the model config's ``max_position_embeddings``."""
    _offline_env()
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device="cpu",
              max_length=max_length or getattr(model.config, "max_position_embeddings", None))
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(tasks),
        task_manager=task_manager,
        limit=limit,
        log_samples=False,
        bootstrap_iters=bootstrap_iters,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    if results is None:  # only on non-zero ranks of a distributed run
        raise RuntimeError("lm_eval.simple_evaluate returned no results")
    return dict(results)


def json_default(value):
    """JSON fallback for lm-eval's results (numpy scalars, callables in task configs, ...)."""
    from lm_eval.utils import handle_non_serializable

    return handle_non_serializable(value)


def metric_rows(results: dict) -> list[tuple[str, str, float, float | None]]:
    """``(task, metric, value, stderr or None)`` for every numeric metric in ``results["results"]``,
    in lm-eval's order; lm-eval's ``"<metric>,<filter>"`` keys become ``metric`` for the default
    ``none`` filter and ``metric_<filter>`` otherwise."""
    rows = []
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if metric.endswith("_stderr") or metric in NOT_METRICS or not isinstance(value, (int, float)) \
                    or isinstance(value, bool):
                continue
            stderr = metrics.get(f"{metric}_stderr,{filt}" if filt else f"{metric}_stderr")
            name = metric if filt in ("", "none") else f"{metric}_{filt}"
            rows.append((task, name, float(value), float(stderr) if isinstance(stderr, (int, float)) else None))
    return rows


def flat_metrics(results: dict) -> dict[str, float]:
    """``{"<task>/<metric>": value}``: the flat metrics file DVC and KFP read."""
    return {f"{task}/{metric}": value for task, metric, value, _ in metric_rows(results)}
