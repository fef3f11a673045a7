"""Resolve and load the evaluate step's inputs; every error names the path and how to fix it.

Layouts accepted (the other steps' outputs):

    model_dir     Hugging Face directory of LinearMoEForCausalLM: config.json + weights
                  (model.safetensors, sharded index or pytorch_model.bin); may hold the tokenizer
    test_data     a JSON-lines file of {"text": ...}, or the tokenize output directory
                  (its test.jsonl; its tokenizer/ is the fallback tokenizer)
    train_metrics the train step's metrics.jsonl, or the directory that holds it
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TEST_TEXT_FILE = "test.jsonl"  # as written by the tokenize step (components/tokenize/core.py)
TOKENIZER_DIR = "tokenizer"  # idem
METRICS_FILE = "metrics.jsonl"  # as written by the train step (components/train/metrics.py)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def resolve_model_dir(model_dir: str | Path) -> Path:
    path = Path(model_dir)
    if not path.is_dir():
        raise ValueError(f"model_dir {path}: no such directory (pass the converted Hugging Face model directory)")
    if not (path / "config.json").is_file():
        raise ValueError(f"model_dir {path}: no config.json (not a Hugging Face model directory; "
                         "run the convert step or save_pretrained() into it)")
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise ValueError(f"model_dir {path}: no weights file (expected one of {list(WEIGHT_FILES)})")
    return path


def resolve_test_data(test_data: str | Path) -> Path:
    """The JSON-lines file: ``test_data`` itself, or ``test_data/test.jsonl`` for a directory."""
    path = Path(test_data)
    if path.is_dir():
        path = path / TEST_TEXT_FILE
        if not path.is_file():
            raise ValueError(f"test_data {path}: no such file (pass the tokenize output directory, "
                             f"which holds {TEST_TEXT_FILE}, or a .jsonl file of {{\"text\": ...}})")
    elif not path.is_file():
        raise ValueError(f"test_data {path}: no such file or directory")
    return path


def resolve_tokenizer_dir(tokenizer: str | Path | None, model_dir: Path, test_data: str | Path) -> Path:
    """``tokenizer`` if given, else the first of ``model_dir``, ``model_dir/tokenizer``,
    ``<test_data dir>/tokenizer`` that holds tokenizer files."""
    if tokenizer is not None:
        candidates = [Path(tokenizer)]
    else:
        data_dir = Path(test_data) if Path(test_data).is_dir() else Path(test_data).parent
        candidates = [model_dir, model_dir / TOKENIZER_DIR, data_dir / TOKENIZER_DIR]
    for path in candidates:
        if path.is_dir() and any((path / name).is_file() for name in TOKENIZER_FILES):
            return path
    tried = ", ".join(str(p) for p in candidates)
    raise ValueError(f"tokenizer: no tokenizer files {list(TOKENIZER_FILES)} in {tried} "
                     "(pass tokenizer=<Hugging Face tokenizer directory>, e.g. the tokenize output's tokenizer/)")


def load_model(model_dir: Path):
    """``LinearMoEForCausalLM`` (or any registered causal LM) from ``model_dir``, fp32, eval mode, CPU."""
    import torch
    from transformers import AutoModelForCausalLM

    import linear_moe.model.modeling  # noqa: F401  registers the linear_moe model type

    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True, dtype=torch.float32)
    except Exception as err:  # transformers, safetensors and torch raise many types for a damaged directory
        raise ValueError(f"model_dir {model_dir}: cannot load the model ({type(err).__name__}: {err}); its files are "
                         "missing, truncated or corrupt: rerun the convert step into it") from None
    return model.eval()


def load_tokenizer(tokenizer_dir: Path):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    except Exception as err:  # transformers and tokenizers raise many types for damaged files
        raise ValueError(f"tokenizer {tokenizer_dir}: cannot load the tokenizer ({type(err).__name__}: {err}); its "
                         "files are damaged: pass an intact tokenizer directory (the tokenize output's tokenizer/)") \
            from None
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer {tokenizer_dir}: has no eos token (set eos_token in tokenizer_config.json)")
    return tok


def read_train_metrics(train_metrics: str | Path) -> list[dict]:
    """The records of the train step's ``metrics.jsonl`` (a file, or a directory holding it)."""
    path = Path(train_metrics)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        raise ValueError(f"train_metrics {path}: no such file (pass the train step's {METRICS_FILE} "
                         "or its output directory)")
    records = []
    for line_no, record in read_json_lines(path, "train_metrics"):
        if not isinstance(record, dict):
            raise ValueError(f"train_metrics {path}, line {line_no}: expected a JSON object such as "
                             f'{{"step": 1, "loss": 2.5}}, got {type(record).__name__}; pass the train step\'s '
                             f"{METRICS_FILE}")
        records.append(record)
    return records


def read_json_lines(path: Path, what: str) -> list[tuple[int, Any]]:
    """``(line number, value)`` of every non-blank line of a UTF-8 JSON-lines file; invalid UTF-8 or
    JSON is an error naming ``what``, the file and the line."""
    values = []
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{what} {path}, line {line_no}: not UTF-8 (invalid byte 0x{raw[err.start]:02x} at "
                                 f"column {err.start + 1}); re-encode the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                values.append((line_no, json.loads(line)))
            except json.JSONDecodeError as err:
                raise ValueError(f"{what} {path}, line {line_no}: not valid JSON ({err.msg})") from None
    return values
