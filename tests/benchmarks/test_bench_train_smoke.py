"""Smoke tests of ``python -m benchmarks.bench_train`` on tiny CPU shapes: it runs, and the JSON it
writes holds the declared keys and numbers consistent with its own raw measurements. No timing
assertions (shared CPUs)."""
from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

TINY_MODEL = {"hidden_size": 64, "num_heads": 4, "num_experts": 4, "moe_top_k": 2, "moe_ffn_hidden_size": 64,
              "ffn_hidden_size": 128, "vocab_size": 512, "chunk_size": 16}


def _run_bench(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "train.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_train", "--out", str(out), "--threads", "1",
                           "--warmup", "1", "--steps", "1", *args],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert not list(tmp_path.glob("*.tmp")), "the temporary file of the atomic write was left behind"
    return json.loads(out.read_text())


def _check_declared_keys(result: dict) -> None:
    from benchmarks.bench_train import CASE_KEYS, STATUSES, TOP_KEYS

    assert set(TOP_KEYS) <= set(result), sorted(set(TOP_KEYS) - set(result))
    assert result["complete"] is True
    assert result["versions"]["torch"] and result["versions"]["fla"] and result["device_name"]
    for case in result["cases"]:
        assert set(CASE_KEYS) <= set(case), sorted(set(CASE_KEYS) - set(case))
        assert case["status"] in STATUSES


def _check_ok_case(case: dict, vocab_size: int) -> None:
    """Numbers against their definitions: tokens per step from the shapes, tokens/s from the raw step
    times, and the loss on uniformly random labels at init close to ln(vocab)."""
    assert case["status"] == "ok", case.get("traceback", case.get("error"))
    assert case["step_fn"] == "trainer"
    assert case["tokens_per_step"] == case["seq_length"] * case["micro_batch_size"] * case["num_microbatches"]
    assert case["tokens_per_s"] == pytest.approx(case["tokens_per_step"] / statistics.median(case["step_s"]))
    assert case["peak_memory_mb"] > 0
    assert abs(case["losses"][0] - math.log(vocab_size)) < 0.1 * math.log(vocab_size)


def test_cpu_tiny_writes_declared_keys(tmp_path):
    result = _run_bench(tmp_path, "--suite", "cpu-tiny", "--seq-length", "32", "--micro-batch-size", "2")
    _check_declared_keys(result)
    assert result["suite"] == "cpu-tiny" and result["device"] == "cpu"
    (case,) = result["cases"]
    assert (case["seq_length"], case["micro_batch_size"], case["num_microbatches"]) == (32, 2, 1)
    _check_ok_case(case, case["model_config"]["vocab_size"])


def test_gpu_lengths_summary_matches_cases(tmp_path):
    result = _run_bench(tmp_path, "--suite", "gpu-lengths", "--model-overrides", json.dumps(TINY_MODEL),
                        "--layers", "1", "--lengths", "32,64", "--tokens-per-step", "128", "--mixers", "gla,softmax")
    _check_declared_keys(result)
    cases = {case["name"]: case for case in result["cases"]}
    assert sorted(cases) == ["gla/T32", "gla/T64", "softmax/T32", "softmax/T64"]
    for case in cases.values():
        _check_ok_case(case, TINY_MODEL["vocab_size"])
        assert case["tokens_per_step"] == 128
        assert case["layer_pattern"] == ("A" if case["group"] == "softmax" else "L")
    for mixer in ("gla", "softmax"):
        tps = [cases[f"{mixer}/T{T}"]["tokens_per_s"] for T in (32, 64)]
        summary = result["summary"][mixer]
        assert summary["max_over_min"] == pytest.approx(max(tps) / min(tps))
        assert summary["drop_shortest_to_longest"] == pytest.approx(1 - tps[1] / tps[0])
    gla_over_softmax = cases["gla/T64"]["tokens_per_s"] / cases["softmax/T64"]["tokens_per_s"]
    assert result["summary"]["gla"]["over_softmax"]["64"] == pytest.approx(gla_over_softmax)


def test_a_run_cut_short_keeps_the_cases_it_measured(tmp_path, monkeypatch):
    """The JSON is rewritten after every case, so a timeout loses only the case in flight."""
    import benchmarks.bench_train as bench

    measured = []

    def run_case(case, args):
        if measured:
            raise KeyboardInterrupt  # what a timeout's signal does to the second case
        measured.append(case.name)
        return {**bench.base_row(case, args, "error"), "error": "stand-in row"}

    monkeypatch.setattr(bench, "run_case", run_case)
    out = tmp_path / "train.json"
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--out", str(out), "--suite", "gpu-lengths", "--model-overrides", json.dumps(TINY_MODEL),
                    "--layers", "1", "--lengths", "32,64", "--tokens-per-step", "128", "--mixers", "gla"])
    result = json.loads(out.read_text())
    assert result["complete"] is False
    assert [case["name"] for case in result["cases"]] == measured == ["gla/T32"]
    assert result["cases"][0]["error"] == "stand-in row"
