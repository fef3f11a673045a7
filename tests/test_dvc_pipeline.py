"""The README's main command path: `dvc repro` of the whole pipeline in a fresh git repository,
offline, then `dvc exp run -S train.steps=...`. Small params keep it to a few minutes."""
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SMALL = {
    "tokenize": dict(max_bytes=200_000, vocab_size=512, workers=1),
    "train": dict(steps=6, seq_length=64, micro_batch_size=4, global_batch_size=8, eval_interval=3,
                  save_interval=3, warmup_steps=2),
    "evaluate": dict(limit=8, batch_size=4, num_samples=1),
}


@pytest.mark.e2e
def test_dvc_repro_runs_the_whole_pipeline_offline_then_an_experiment(tmp_path):
    repo = tmp_path / "repo"
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    for name in tracked.splitlines():
        if name.startswith(("tests/", "benchmarks/results/")) or not (REPO / name).is_file():
            continue
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, repo / name)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for section, values in SMALL.items():
        params[section].update(values)
    params["train"]["model_overrides"]["vocab_size"] = 512
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (repo / "dvc.lock").unlink(missing_ok=True)

    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}

    def run(*cmd: str) -> str:
        proc = subprocess.run(list(cmd), cwd=repo, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc.stdout

    run("git", "init", "-q")
    run("git", "add", "-A")
    run("git", "commit", "-qm", "pipeline")
    started = time.perf_counter()
    run(str(bin_dir / "dvc"), "repro")
    print(f"dvc repro (small params) took {time.perf_counter() - started:.1f} s")

    evaluation = repo / "runs" / "eval"
    report = (evaluation / "report.html").read_text()
    assert "<table" in report and "data:image/png;base64," in report
    metrics = json.loads((evaluation / "metrics.json").read_text())
    assert metrics and all(math.isfinite(v) for v in metrics.values())
    assert metrics["heldout_perplexity/word_perplexity"] > 1.0
    results = json.loads((evaluation / "results.json").read_text())
    assert {"heldout_perplexity", "heldout_cloze", "heldout_choice"} <= set(results["results"])
    train_records = [json.loads(line) for line in (repo / "runs/train/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in train_records] == list(range(1, 7))
    assert (repo / "runs/hf/config.json").exists()
    assert "up to date" in run(str(bin_dir / "dvc"), "status").lower()

    run("git", "add", "-A")
    run("git", "commit", "-qm", "pipeline outputs")
    run(str(bin_dir / "dvc"), "exp", "run", "-S", "train.steps=8")
    train_records = [json.loads(line) for line in (repo / "runs/train/metrics.jsonl").read_text().splitlines()]
    assert train_records[-1]["step"] == 8
    shown = json.loads(run(str(bin_dir / "dvc"), "exp", "show", "--json"))
    assert 8 in _train_steps_shown(shown), "dvc exp show lists no experiment with train.steps=8"


def _train_steps_shown(node) -> list:
    """Every ``train.steps`` value of params.yaml anywhere in ``dvc exp show --json`` output."""
    found = []
    if isinstance(node, dict):
        params = node.get("params.yaml")
        if isinstance(params, dict):
            found.append(params.get("data", {}).get("train", {}).get("steps"))
        for value in node.values():
            found += _train_steps_shown(value)
    elif isinstance(node, list):
        for value in node:
            found += _train_steps_shown(value)
    return found
