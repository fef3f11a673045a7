"""``python -m linear_moe.pipelines run-local`` end to end with the real components on a tiny config."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

TINY = ["--preset", "tiny", "--lsm-mixer", "gla", "--max-bytes", "300000", "--vocab-size", "300", "--steps", "4",
        "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "4", "--eval-interval", "2",
        "--save-interval", "0", "--eval-limit", "8", "--eval-batch-size", "4", "--eval-num-samples", "1"]


def _metrics(task_dir: Path, name: str) -> dict:
    output = json.loads((task_dir / "executor_output.json").read_text())
    (artifact,) = output["artifacts"][name]["artifacts"]
    return artifact["metadata"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("kfp-local")
    out = subprocess.run([sys.executable, "-m", "linear_moe.pipelines", "run-local", "--pipeline-root", str(root),
                          *TINY], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    run = Path(out.stdout.strip().splitlines()[-1])
    assert run.parent == root and run.is_dir()
    return run


@pytest.mark.e2e
def test_tokenize_stats_match_the_indexed_dataset(run_dir):
    """Reference: megatron's IndexedDataset reader and the HF tokenizer over the dataset artifact."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from transformers import AutoTokenizer

    dataset = run_dir / "tokenize-component" / "dataset"
    stats = _metrics(run_dir / "tokenize-component", "stats")
    for split in ("train", "valid", "test"):
        indexed = IndexedDataset(str(dataset / split))
        assert stats[f"{split}_tokens"] == int(indexed.sequence_lengths.sum()), split
        assert stats[f"{split}_documents"] == len(indexed.document_indices) - 1, split
    assert stats["tokens"] == sum(stats[f"{s}_tokens"] for s in ("train", "valid", "test"))
    assert stats["vocab_size"] == len(AutoTokenizer.from_pretrained(str(dataset / "tokenizer"))) == 300
    assert stats["test_documents"] == len((dataset / "test.jsonl").read_text().splitlines())
    assert 250_000 <= stats["bytes"] <= 400_000  # max_bytes 300000 reached the step (the corpus is ~5 MB)


@pytest.mark.e2e
def test_train_metrics_are_the_runs_final_record(run_dir):
    task = run_dir / "train-component"
    metrics = _metrics(task, "metrics")
    records = [json.loads(line) for line in (task / "checkpoint" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert metrics["loss"] == records[-1]["loss"] and metrics["eval_loss"] == records[-1]["eval_loss"]
    assert all(math.isfinite(v) for v in metrics.values())
    assert 0 < metrics["loss"] < 2 * math.log(300)  # about ln(vocab) for a barely trained model
    config = json.loads((task / "checkpoint" / "train_config.json").read_text())
    assert {k: config[k] for k in ("steps", "seq_length", "micro_batch_size", "global_batch_size", "reset_at_eod")} == \
        {"steps": 4, "seq_length": 32, "micro_batch_size": 2, "global_batch_size": 4, "reset_at_eod": True}
    assert json.loads((task / "checkpoint" / "model_config.json").read_text())["vocab_size"] == 300


@pytest.mark.e2e
@pytest.mark.filterwarnings("ignore:You may be attemping to run a task that uses custom:RuntimeWarning")
def test_evaluate_metrics_match_evaluate_on_the_converted_model(run_dir, tmp_path):
    """Reference: evaluate() called here on the convert step's hf_model artifact with the same settings."""
    from linear_moe.components.evaluate import evaluate

    metrics = _metrics(run_dir / "evaluate-component", "metrics")
    assert {"heldout_perplexity/word_perplexity", "heldout_perplexity/bits_per_byte", "heldout_cloze/acc",
            "heldout_choice/acc"} <= set(metrics)
    assert all(math.isfinite(v) for v in metrics.values())
    reference = evaluate(run_dir / "convert-component" / "hf_model", run_dir / "tokenize-component" / "dataset",
                         tmp_path / "eval", limit=8, batch_size=4, seed=1234, num_samples=0, bootstrap_iters=0)
    assert metrics == pytest.approx(reference.metrics, rel=1e-6)
    evaluate_dir = run_dir / "evaluate-component"
    assert (evaluate_dir / "report").read_text().startswith("<!DOCTYPE html>")
    assert "heldout_perplexity" in (evaluate_dir / "table").read_text()
