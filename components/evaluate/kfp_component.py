"""KFP v2 component of the evaluate step: artifact paths -> :func:`evaluate` arguments.

Heavy imports live inside the function body (KFP runs the body in the project image), so importing
this module to compile a pipeline stays fast. ``results`` is the whole artifact directory (see
core.py); ``report`` and ``table`` are copies of its report.html and results.md for the KFP UI.
"""
from kfp import dsl

from linear_moe.pipelines.images import PROJECT_IMAGE


@dsl.component(base_image=PROJECT_IMAGE)
def evaluate_component(
    model: dsl.Input[dsl.Model],
    data: dsl.Input[dsl.Dataset],
    metrics: dsl.Output[dsl.Metrics],
    report: dsl.Output[dsl.HTML],
    table: dsl.Output[dsl.Markdown],
    results: dsl.Output[dsl.Artifact],
    train_metrics: dsl.Input[dsl.Artifact] = None,
    tokenizer: str = "",
    tasks: str = "builtin",
    limit: float = 0.0,
    batch_size: int = 8,
    seed: int = 1234,
    max_length: int = 0,
    num_samples: int = 3,
    sample_tokens: int = 48,
    text_field: str = "text",
    bootstrap_iters: int = 100000,
):
    """Evaluate ``model`` (converted HF directory) on ``data`` (tokenize output: test.jsonl, tokenizer/).
    ``train_metrics`` is the train output (its metrics.jsonl), optional. Empty strings and zeros
    stand for None (KFP parameters cannot be None)."""
    import shutil
    from pathlib import Path

    from linear_moe.components.evaluate import evaluate
    from linear_moe.components.evaluate.core import REPORT_FILE, TABLE_FILE

    result = evaluate(
        model.path,
        data.path,
        results.path,
        tokenizer=tokenizer or None,
        train_metrics=train_metrics.path if train_metrics is not None else None,
        tasks=tasks,
        limit=(int(limit) if limit >= 1 else limit) or None,
        batch_size=batch_size,
        seed=seed,
        max_length=max_length or None,
        num_samples=num_samples,
        sample_tokens=sample_tokens,
        text_field=text_field,
        bootstrap_iters=bootstrap_iters,
    )
    out = Path(results.path)
    shutil.copyfile(out / REPORT_FILE, report.path)
    shutil.copyfile(out / TABLE_FILE, table.path)
    for key, value in result.metrics.items():
        metrics.log_metric(key, value)
