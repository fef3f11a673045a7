"""Command line of the evaluate step: ``python -m linear_moe.components.evaluate --help``.

Values come from, in rising priority: the defaults of :func:`evaluate`, the ``evaluate:`` section
of ``--params`` (a params.yaml whose keys are the argument names), then the flags given.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from linear_moe.components import params
from linear_moe.components.evaluate.core import evaluate

SECTION = "evaluate"  # params.yaml section read by --params
REQUIRED = ("model_dir", "test_data", "output_dir")


def _none_or(kind):
    def parse(text: str):
        return None if text.lower() in ("", "none", "null") else kind(text)

    parse.__name__ = kind.__name__
    return parse


def _count_or_fraction(text: str) -> int | float:
    value = float(text)
    return int(value) if value >= 1 and value.is_integer() else value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m linear_moe.components.evaluate",
        description="Evaluate a converted Linear-MoE Hugging Face model with lm-eval (offline) on a task suite "
        "built from the held-out test documents, and write results.json, results.md, metrics.json, "
        "samples.json, plots/*.png and a self-contained report.html to OUTPUT_DIR.",
        argument_default=argparse.SUPPRESS,  # only given flags override params.yaml / defaults
    )
    p.add_argument("--params", type=Path, help=f"YAML file whose '{SECTION}:' section sets any option below "
                   "(keys = option names with underscores); flags given here win")
    p.add_argument("--model-dir", help="converted Hugging Face model directory: config.json + weights (required)")
    p.add_argument("--test-data", help="held-out documents: the tokenize output directory (its test.jsonl) or "
                   "a .jsonl file of {\"text\": ...} lines (required)")
    p.add_argument("--output-dir", help="artifact directory; created, files in it replaced atomically (required)")
    p.add_argument("--tokenizer", type=_none_or(str), help="Hugging Face tokenizer directory (default: the model "
                   "directory if it holds one, else TEST_DATA's tokenizer/)")
    p.add_argument("--train-metrics", type=_none_or(str), help="the train step's metrics.jsonl or its directory, "
                   "for the loss-curve and expert-load plots (default: none, no training plots)")
    p.add_argument("--tasks", help="comma-separated: 'builtin' (held-out perplexity, LAMBADA-style cloze, "
                   "HellaSwag-style choice) and/or lm-eval task names such as piqa,hellaswag; those run only "
                   "when their dataset is in the local Hugging Face cache (default: builtin)")
    p.add_argument("--limit", type=_none_or(_count_or_fraction), help="at most N examples per task, or a "
                   "fraction < 1 of each task (default: none = all)")
    p.add_argument("--batch-size", type=int, help="lm-eval batch size (default: 8)")
    p.add_argument("--seed", type=int, help="seed of the choice task's distractors and lm-eval's samplers "
                   "(default: 1234)")
    p.add_argument("--max-length", type=_none_or(int), help="longest token window fed to the model; longer "
                   "documents are scored in rolling windows (default: the model's max_position_embeddings)")
    p.add_argument("--num-samples", type=int, help="greedy generations of held-out prompts shown in the "
                   "report (default: 3)")
    p.add_argument("--sample-tokens", type=int, help="new tokens per generation (default: 48)")
    p.add_argument("--text-field", help="JSON field of the test documents holding the text (default: text)")
    p.add_argument("--bootstrap-iters", type=int, help="lm-eval bootstrap draws for the stderr of "
                   "perplexity-type metrics; 0 = no stderr (default: 100000)")
    return p


def load_section(path: Path) -> dict:
    """The ``evaluate:`` section of a params YAML file, checked against :func:`evaluate`'s arguments and their types."""
    return params.load_section(path, SECTION, evaluate)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    params_file = args.pop("params", None)
    try:
        kwargs = {**(load_section(params_file) if params_file else {}), **args}
        missing = [name for name in REQUIRED if name not in kwargs]
        if missing:
            parser.error(f"missing {', '.join('--' + m.replace('_', '-') for m in missing)} "
                         "(as flags or in the params file)")
        result = evaluate(**kwargs)
    except ValueError as err:  # bad input or arguments: a message, not a traceback
        print(f"evaluate: error: {err}", file=sys.stderr)
        return 2
    json.dump(result.metrics, sys.stdout, indent=2, sort_keys=True)
    print()
    return 0
