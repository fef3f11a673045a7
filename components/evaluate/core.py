"""The entry function of the evaluate step: :func:`evaluate`.

Output directory (the directory itself is reused; every artifact is computed before any is written,
then each file is replaced atomically, so a failed run leaves the previous run's artifacts)::

    tasks/          built-in lm-eval task YAMLs + their JSON-lines data (see tasks.py)
    results.json    lm-eval's results dict (results, configs, versions, n-shot, n-samples, ...)
    results.md      Markdown table: task | metric | value | stderr
    metrics.json    flat {"<task>/<metric>": value} for DVC and KFP
    samples.json    greedy generate() continuations of held-out prompts
    plots/          eval_metrics.png, and from train_metrics: loss_curve.png, expert_load.png
    report.html     one self-contained page: summary, table, plots, samples, model config
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from linear_moe.components.evaluate import inputs
from linear_moe.components.files import atomic_write_json, atomic_write_text
from linear_moe.components.evaluate.tasks import BUILTIN, read_documents, write_suite

TASKS_DIR = "tasks"
PLOTS_DIR = "plots"
RESULTS_FILE = "results.json"
TABLE_FILE = "results.md"
METRICS_FILE = "metrics.json"
SAMPLES_FILE = "samples.json"
REPORT_FILE = "report.html"


@dataclass
class EvaluateResult:
    output_dir: Path  # where the artifacts are
    metrics: dict[str, float]  # the contents of metrics.json
    results: dict  # lm-eval's results dict (as in results.json)


def parse_tasks(tasks: str | Sequence[str]) -> list[str]:
    """A comma-separated string or a sequence of names -> unique names in order."""
    names = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    names = list(dict.fromkeys(n.strip() for n in names if n.strip()))
    if not names:
        raise ValueError(f"tasks: no task named in {tasks!r}; use 'builtin' and/or lm-eval task names")
    return names


def evaluate(
    model_dir: str | Path,
    test_data: str | Path,
    output_dir: str | Path,
    *,
    tokenizer: str | Path | None = None,
    train_metrics: str | Path | None = None,
    tasks: str | Sequence[str] = (BUILTIN,),
    limit: int | float | None = None,
    batch_size: int = 8,
    seed: int = 1234,
    max_length: int | None = None,
    num_samples: int = 3,
    sample_tokens: int = 48,
    text_field: str = "text",
    bootstrap_iters: int = 100000,
) -> EvaluateResult:
    """Evaluate the model in ``model_dir`` with lm-eval and write the artifacts to ``output_dir``.

    Args:
        model_dir: Hugging Face directory of the converted model (config.json + weights).
        test_data: held-out documents: a ``.jsonl`` of ``{"text": ...}`` or the tokenize output dir.
        output_dir: artifact directory (created; files in it are replaced atomically).
        tokenizer: Hugging Face tokenizer directory; ``None`` = ``model_dir`` if it holds one, else
            ``<test_data dir>/tokenizer``.
        train_metrics: the train step's ``metrics.jsonl`` (or its directory) for the loss curve and
            expert-load plots; ``None`` = no training plots.
        tasks: ``"builtin"`` (the held-out suite: perplexity, cloze, choice) and/or lm-eval task
            names (need their dataset in the local HF cache; offline otherwise fails naming the task).
        limit: at most this many examples per task (a float < 1: that fraction); ``None`` = all.
        batch_size: lm-eval batch size.
        seed: seed of the built-in suite's distractors and of lm-eval's samplers.
        max_length: longest window lm-eval feeds the model; ``None`` = ``max_position_embeddings``.
        num_samples: greedy generations shown in the report (0 = none).
        sample_tokens: new tokens per generation.
        text_field: JSON field of the test documents holding the text.
        bootstrap_iters: lm-eval bootstrap draws for the stderr of perplexity-type metrics (0 = none).
    """
    task_names = parse_tasks(tasks)
    _check_args(batch_size=batch_size, num_samples=num_samples, sample_tokens=sample_tokens,
                max_length=max_length, limit=limit, bootstrap_iters=bootstrap_iters)
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output_dir {out} exists and is not a directory; remove it or choose another directory")
    model_path = inputs.resolve_model_dir(model_dir)
    test_path = inputs.resolve_test_data(test_data)
    tokenizer_path = inputs.resolve_tokenizer_dir(tokenizer, model_path, test_data)
    train_records = inputs.read_train_metrics(train_metrics) if train_metrics is not None else []
    docs = read_documents(test_path, text_field)

    from linear_moe.components.evaluate import harness, report
    from linear_moe.components.evaluate.samples import generate_samples

    # everything that can fail on bad input fails here, before output_dir is touched (tasks/ aside)
    tok = inputs.load_tokenizer(tokenizer_path)
    model = inputs.load_model(model_path)
    model_config = json.loads((model_path / "config.json").read_text())
    tasks_dir = out / TASKS_DIR
    tasks_dir.mkdir(parents=True, exist_ok=True)
    builtin = write_suite(docs, tasks_dir, seed=seed, source=f"test data {test_path}") if BUILTIN in task_names else []
    run_names = [n for name in task_names for n in (builtin if name == BUILTIN else [name])]
    manager = harness.make_task_manager(tasks_dir, [n for n in run_names if n not in builtin])  # names unknown/offline

    results = harness.run_lm_eval(model, tok, run_names, manager, batch_size=batch_size, limit=limit, seed=seed,
                                  max_length=max_length, bootstrap_iters=bootstrap_iters)
    results = json.loads(json.dumps(results, default=harness.json_default))  # what results.json holds
    rows = harness.metric_rows(results)
    metrics = harness.flat_metrics(results)
    samples = generate_samples(model, tok, docs, num_samples=num_samples, max_new_tokens=sample_tokens)
    rendered = report.render_plots(rows, train_records)
    plots = {name: png for name, png in rendered.items() if png is not None}
    summary = {"model": model_path, "tokenizer": tokenizer_path, "test data": f"{test_path} ({len(docs)} documents)",
               "tasks": ", ".join(run_names), "limit": limit, "seed": seed,
               "lm-eval": results.get("lm_eval_version", ""), "training records": len(train_records)}
    html = report.render_html(title=f"Linear-MoE evaluation: {model_path.name}", rows=rows, plots=plots,
                              samples=samples, model_config=model_config, summary=summary)

    # every artifact is computed: only now replace the previous run's files (each one atomically)
    atomic_write_json(out / RESULTS_FILE, results)
    atomic_write_json(out / METRICS_FILE, metrics)
    atomic_write_text(out / TABLE_FILE, report.markdown_table(rows))
    atomic_write_json(out / SAMPLES_FILE, samples)
    report.write_plots(out / PLOTS_DIR, rendered)
    atomic_write_text(out / REPORT_FILE, html)
    return EvaluateResult(out, metrics, results)


def _check_args(**values) -> None:
    minimum = {"batch_size": 1, "sample_tokens": 1, "max_length": 2, "num_samples": 0, "bootstrap_iters": 0}
    for name, low in minimum.items():
        value = values[name]
        if value is not None and value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    limit = values["limit"]
    if limit is not None and limit <= 0:
        raise ValueError(f"limit must be positive (a count, or a fraction < 1) or None for all, got {limit}")
