"""train_component: in-process against train(), the TrainJob path against the in-process run, bad input.

The component's Python function is called with hand-made artifacts, so the TrainJob launcher's cluster
calls can be replaced by an in-memory stand-in that parses the job's command with the train CLI and
trains that config here (what the pods would do).
"""
import json
import math
from pathlib import Path

import pytest
from kfp import dsl

from linear_moe.components.train import TrainConfig, train
from linear_moe.components.train.kfp_component import train_component
from linear_moe.components.train.metrics import read_metrics
from linear_moe.pipelines import trainjob

ARGS = dict(preset="tiny", lsm_mixer="gla", vocab_size=300, steps=3, seq_length=32, micro_batch_size=2,
            global_batch_size=4, lr=2e-3, seed=7, save_interval=2, eval_interval=3)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    from linear_moe.components.tokenize import tokenize

    out = tmp_path_factory.mktemp("tokenized") / "data"
    tokenize(out, vocab_size=300, max_bytes=300_000, progress=False)
    return out


@pytest.fixture(autouse=True)
def _world_of_one(monkeypatch):
    """Each test trains as a world of one: no torchrun variables from the surrounding environment."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "KUBERNETES_SERVICE_HOST"):
        monkeypatch.delenv(name, raising=False)


def _run(data_dir: Path, out: Path, **kwargs):
    checkpoint = dsl.Model(uri=str(out / "checkpoint"))
    metrics = dsl.Metrics(uri=str(out / "metrics"))
    train_component.python_func(data=dsl.Dataset(uri=str(data_dir)), checkpoint=checkpoint, metrics=metrics,
                                **{**ARGS, **kwargs})
    return Path(checkpoint.path), metrics.metadata


@pytest.fixture(scope="module")
def in_process(data_dir, tmp_path_factory):
    import os

    saved = dict(os.environ)
    try:
        return _run(data_dir, tmp_path_factory.mktemp("in_process"))
    finally:
        os.environ.clear()
        os.environ.update(saved)


def test_in_process_matches_train_function(data_dir, in_process, tmp_path):
    """Reference: train() called directly with the TrainConfig the component documents."""
    checkpoint, metrics = in_process
    reference = train(TrainConfig(preset="tiny", model_overrides={"vocab_size": 300, "lsm_mixer": "gla"},
                                  data_dir=str(data_dir), output_dir=str(tmp_path / "ref"), seq_length=32,
                                  micro_batch_size=2, global_batch_size=4, steps=3, lr=2e-3, min_lr=2e-4, seed=7,
                                  save_interval=2, eval_interval=3, dvclive=False, reset_at_eod=True))
    assert metrics["loss"] == pytest.approx(reference["loss"], rel=1e-5)
    assert metrics["eval_loss"] == pytest.approx(reference["eval_loss"], rel=1e-5)
    assert metrics["step"] == 3 and metrics["tokens_per_s"] > 0
    assert all(math.isfinite(v) for v in metrics.values())
    assert sorted(p.name for p in checkpoint.iterdir()) == ["checkpoints", "metrics.jsonl", "model_config.json",
                                                           "train_config.json"]
    assert sorted(p.name for p in (checkpoint / "checkpoints").iterdir()) == ["step_0000002", "step_0000003"]
    model_config = json.loads((checkpoint / "model_config.json").read_text())
    assert (model_config["vocab_size"], model_config["lsm_mixer"]) == (300, "gla")


class _PodsHere:
    """Stand-in for the cluster: parses the TrainJob's command with the train CLI and trains it here."""

    def __init__(self):
        self.manifests = []

    def launch_and_wait(self, manifest, api, **kwargs):
        from linear_moe.components.train.__main__ import config_from_args

        self.manifests.append(manifest)
        command = manifest["spec"]["trainer"]["command"]
        assert command[:3] == ["torchrun", "-m", "linear_moe.components.train"]
        train(config_from_args(command[3:]))
        return {"status": {"conditions": [{"type": "Complete", "status": "True"}]}}


def test_trainjob_path_matches_in_process_run(data_dir, in_process, tmp_path, monkeypatch):
    """Reference: the in-process run. Same losses step by step means every TrainConfig field reached the pods."""
    pods = _PodsHere()
    monkeypatch.setattr(trainjob, "connect", lambda kubeconfig=None: "api")
    monkeypatch.setattr(trainjob, "launch_and_wait", pods.launch_and_wait)
    workspace = tmp_path / "workspace"
    checkpoint, metrics = _run(data_dir, tmp_path, use_trainjob=True, nodes=1, gpus_per_node=0,
                               workspace=str(workspace), workspace_pvc="team-pvc", trainjob_namespace="team")

    (manifest,) = pods.manifests
    assert manifest["metadata"]["namespace"] == "team"
    volumes = manifest["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0][
        "template"]["spec"]["template"]["spec"]["volumes"]
    assert {"name": "workspace", "persistentVolumeClaim": {"claimName": "team-pvc"}} in volumes
    run_dir = workspace / manifest["metadata"]["name"]
    assert sorted(p.name for p in run_dir.iterdir()) == ["data", "train"]
    assert sorted(p.name for p in (run_dir / "data").iterdir()) == sorted(p.name for p in data_dir.iterdir())

    ref_checkpoint, ref_metrics = in_process
    losses = [(r["step"], r["loss"]) for r in read_metrics(checkpoint / "metrics.jsonl")]
    ref_losses = [(r["step"], r["loss"]) for r in read_metrics(ref_checkpoint / "metrics.jsonl")]
    assert [s for s, _ in losses] == [s for s, _ in ref_losses] == [1, 2, 3]
    assert [loss for _, loss in losses] == pytest.approx([loss for _, loss in ref_losses], rel=1e-5)
    timing_free = lambda m: {k: v for k, v in m.items() if k != "tokens_per_s"}  # noqa: E731
    assert timing_free(metrics) == pytest.approx(timing_free(ref_metrics), rel=1e-5)
    config = json.loads((checkpoint / "train_config.json").read_text())
    ref_config = json.loads((ref_checkpoint / "train_config.json").read_text())
    differing = sorted(k for k in config if config[k] != ref_config[k])
    assert differing == ["data_dir", "output_dir", "resume"]
    assert not (checkpoint / "data_cache").exists()


def test_trainjob_failure_propagates(data_dir, tmp_path, monkeypatch):
    def failed(manifest, api, **kwargs):
        raise trainjob.TrainJobFailed(manifest["metadata"]["name"], "JobsFailed", "node-0 exited with code 1")

    monkeypatch.setattr(trainjob, "connect", lambda kubeconfig=None: "api")
    monkeypatch.setattr(trainjob, "launch_and_wait", failed)
    with pytest.raises(trainjob.TrainJobFailed, match="node-0 exited with code 1"):
        _run(data_dir, tmp_path, use_trainjob=True, workspace=str(tmp_path / "workspace"))
    assert not (tmp_path / "checkpoint").exists()


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(preset="huge"), ValueError, "unknown preset"),
    (dict(layer_pattern="LQ"), ValueError, "unknown symbol 'Q'"),
    (dict(model_overrides="{hidden_size: 8"), ValueError, "not valid JSON"),
    (dict(tensor_parallel=2, nodes=1, gpus_per_node=0), ValueError, "is not divisible by"),
    (dict(tensor_parallel=3, nodes=2, gpus_per_node=4), ValueError, "is not divisible by"),
    (dict(nodes=2, gpus_per_node=0, micro_batch_size=4, global_batch_size=4), ValueError, "global_batch_size"),
], ids=["preset", "pattern", "json", "tp-cpu", "tp-gpus", "batch"])
def test_trainjob_bad_input_fails_before_the_cluster(data_dir, tmp_path, monkeypatch, kwargs, error, match):
    def no_cluster(*args, **kw):
        raise AssertionError("the cluster must not be contacted when the request is invalid")

    monkeypatch.setattr(trainjob, "connect", no_cluster)
    monkeypatch.setattr(trainjob, "launch_and_wait", no_cluster)
    workspace = tmp_path / "workspace"
    with pytest.raises(error, match=match):
        _run(data_dir, tmp_path, use_trainjob=True, workspace=str(workspace), **kwargs)
    assert not workspace.exists()


def test_trainjob_missing_kubeconfig_names_it_before_staging(data_dir, tmp_path, monkeypatch):
    missing = tmp_path / "nope" / "config"
    monkeypatch.setenv("KUBECONFIG", str(missing))
    workspace = tmp_path / "workspace"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        _run(data_dir, tmp_path, use_trainjob=True, workspace=str(workspace))
    assert not workspace.exists()
