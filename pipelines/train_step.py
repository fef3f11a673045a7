"""The pipeline's train step: one :class:`TrainConfig`, trained in this process or in a TrainJob.

``train_component`` (components/train/kfp_component.py) only turns artifact paths into arguments of
:func:`run_train_step`.  In-process (``use_trainjob=False``) the output directory is the checkpoint
artifact itself.  Through a TrainJob the dataset is first copied under the workspace PVC, the job runs
``torchrun -m linear_moe.components.train`` with every TrainConfig field as a flag (so the pods train
exactly the config built here), and the finished output directory is copied back into the artifact.
"""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from linear_moe.components.train.config import TrainConfig

# Left out of the checkpoint artifact: the sample-index cache and unfinished checkpoints.
ARTIFACT_IGNORE = ("data_cache", "*.partial")
# TrainConfig fields that trainjob.train_command renders itself.
COMMAND_FIELDS = ("preset", "tensor_parallel", "pipeline_parallel", "expert_parallel", "sequence_parallel", "steps",
                  "seq_length", "data_dir", "output_dir", "resume", "model_overrides")
# ModelConfig overrides that trainjob.train_command renders from lsm_mixer / layer_pattern.
PATTERN_OVERRIDES = ("lsm_mixer", "layer_pattern", "num_layers")


def model_overrides(overrides_json: str = "", *, lsm_mixer: str = "", layer_pattern: str = "",
                    vocab_size: int = 0) -> dict[str, Any]:
    """ModelConfig overrides over the preset, later sources winning.

    ``vocab_size`` (the tokenize step's, 0 = the preset's), then the ``overrides_json`` object, then the
    non-empty ``lsm_mixer`` and ``layer_pattern`` (which also sets ``num_layers = len(layer_pattern)``).
    """
    overrides: dict[str, Any] = {"vocab_size": vocab_size} if vocab_size else {}
    if overrides_json.strip():
        try:
            parsed = json.loads(overrides_json)
        except json.JSONDecodeError as error:
            raise ValueError(f"model_overrides {overrides_json!r} is not valid JSON ({error.msg}); "
                             f"pass an object such as '{{\"hidden_size\": 128}}'") from None
        if not isinstance(parsed, dict):
            raise ValueError(f"model_overrides must be a JSON object of ModelConfig fields, got {overrides_json!r}")
        overrides.update(parsed)
    if lsm_mixer:
        overrides["lsm_mixer"] = lsm_mixer
    if layer_pattern:
        overrides.update(layer_pattern=layer_pattern, num_layers=len(layer_pattern))
    return overrides


PARALLEL_FIELDS = ("tensor_parallel", "pipeline_parallel", "expert_parallel", "sequence_parallel")


def train_config(arguments: Mapping[str, Any], data_dir: str = "") -> TrainConfig:
    """The TrainConfig the pipeline's train step trains, from its arguments (the names of
    ``pipelines.pipeline.DEFAULTS`` and of ``train_component``'s parameters); validated on construction.

    ``vocab_size`` is the tokenizer's (0 = the preset's); the cosine schedule decays to ``lr / 10``.
    """
    a = arguments
    return TrainConfig(
        preset=a["preset"],
        model_overrides=model_overrides(a["model_overrides"], lsm_mixer=a["lsm_mixer"],
                                        layer_pattern=a["layer_pattern"], vocab_size=a["vocab_size"]),
        **({"data_dir": data_dir} if data_dir else {}),
        seq_length=a["seq_length"], micro_batch_size=a["micro_batch_size"], global_batch_size=a["global_batch_size"],
        reset_at_eod=a["reset_at_eod"], steps=a["steps"], lr=a["lr"], min_lr=a["lr"] / 10, seed=a["seed"],
        eval_interval=a["eval_interval"], save_interval=a["save_interval"], dvclive=False,
        **{name: a[name] for name in PARALLEL_FIELDS},
    )


def extra_train_flags(config: TrainConfig) -> list[str]:
    """Train CLI flags for every TrainConfig field and model override that ``train_command`` omits."""
    flags: list[str] = []
    for f in dataclasses.fields(TrainConfig):
        if f.name in COMMAND_FIELDS:
            continue
        value, flag = getattr(config, f.name), "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + f.name.replace("_", "-"))
        else:
            flags += [flag, repr(value) if isinstance(value, float) else str(value)]
    for key, value in config.model_overrides.items():
        if key not in PATTERN_OVERRIDES:
            flags += ["--model", f"{key}={json.dumps(value)}"]
    return flags


@dataclass(frozen=True)
class TrainJobTarget:
    """Where a TrainJob runs: its name, image, size and resources, namespace and the shared workspace PVC."""

    name: str  # TrainJob name (DNS-1035 label); also the run's folder under ``workspace``
    image: str  # image of the training pods
    nodes: int = 1
    gpus_per_node: int = 0  # 0 = CPU nodes, one process each
    cpu_per_node: str = ""  # Kubernetes quantity ("32", "500m"), request = limit; "" = unset (build_trainjob)
    memory_per_node: str = ""  # Kubernetes quantity ("400Gi"), request = limit; "" = unset
    namespace: str = "linear-moe"
    pvc: str = "linear-moe-workspace"  # mounted at ``workspace`` here and in the pods
    workspace: str = "/workspace"
    kubeconfig: str | None = None  # None: in-cluster service account (or $KUBECONFIG outside a pod)
    poll_s: float = 10.0
    timeout_s: float | None = None


def prepare_trainjob(config: TrainConfig, target: TrainJobTarget) -> tuple[dict[str, Any], Any]:
    """Check everything that can fail before submitting and connect: returns ``(manifest, api)``.

    The checks of :func:`linear_moe.pipelines.trainjob.run_trainjob` (parallel layout against the
    job's processes, model config, manifest, kubeconfig and API server), with the TrainConfig fields
    that it does not forward (batch sizes, lr, seed, intervals, other model overrides) as extra flags.
    """
    from linear_moe.pipelines import trainjob

    layout = trainjob.ParallelLayout(config.tensor_parallel, config.pipeline_parallel, config.expert_parallel,
                                     config.sequence_parallel)
    config.data_parallel(target.nodes * trainjob.procs_per_node(target.gpus_per_node))  # sizes, then batch sizes
    overrides = config.model_overrides
    command = trainjob.train_command(
        config.preset, lsm_mixer=overrides.get("lsm_mixer", ""), layer_pattern=overrides.get("layer_pattern", ""),
        layout=layout, steps=config.steps, seq_length=config.seq_length, data_dir=config.data_dir,
        output_dir=config.output_dir, extra_args=extra_train_flags(config))
    manifest = trainjob.build_trainjob(target.name, target.image, target.nodes, target.gpus_per_node, command,
                                       namespace=target.namespace, pvc=target.pvc, cpu_per_node=target.cpu_per_node,
                                       memory_per_node=target.memory_per_node)
    return manifest, trainjob.connect(target.kubeconfig)


def run_train_step(config: TrainConfig, artifact_dir: str | Path, target: TrainJobTarget | None = None,
                   log: Callable[[str], None] = print) -> dict[str, float]:
    """Train ``config`` into ``artifact_dir`` (checkpoints/, metrics.jsonl, model_config.json, ...).

    ``target=None`` trains here (a world of one) with ``output_dir = artifact_dir``; otherwise the
    data is staged under ``<workspace>/<name>/data``, the job writes ``<workspace>/<name>/train`` (resumed
    if a retried step finds it) and that folder is copied into ``artifact_dir``.  Returns
    :func:`final_metrics` of the run.  Errors of the job propagate.
    """
    artifact_dir = Path(artifact_dir)
    if target is None:
        from linear_moe.components.train import train

        train(dataclasses.replace(config, output_dir=str(artifact_dir)))
        for name in ARTIFACT_IGNORE:
            for path in artifact_dir.glob(name):
                shutil.rmtree(path)
    else:
        from linear_moe.pipelines import trainjob

        run_dir = Path(target.workspace) / target.name
        data_dir, output_dir = run_dir / "data", run_dir / "train"
        staged = dataclasses.replace(config, data_dir=str(data_dir), output_dir=str(output_dir), resume=True)
        manifest, api = prepare_trainjob(staged, target)
        stage_copy(Path(config.data_dir), data_dir)
        trainjob.launch_and_wait(manifest, api, poll_s=target.poll_s, timeout_s=target.timeout_s, log=log)
        shutil.copytree(output_dir, artifact_dir, dirs_exist_ok=True, ignore=shutil.ignore_patterns(*ARTIFACT_IGNORE))
    return final_metrics(artifact_dir / "metrics.jsonl")


def stage_copy(source: Path, destination: Path) -> None:
    """Copy the directory ``source`` to ``destination`` through a temporary sibling, then rename."""
    if not source.is_dir():
        raise ValueError(f"dataset {source} is not a directory; pass the tokenize step's output directory")
    tmp = destination.with_name(destination.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    shutil.rmtree(destination, ignore_errors=True)
    tmp.rename(destination)


def final_metrics(metrics_path: str | Path) -> dict[str, float]:
    """``loss``, ``tokens_per_s`` and ``step`` of the last record, ``eval_loss`` of the last evaluation."""
    from linear_moe.components.train.metrics import read_metrics

    path = Path(metrics_path)
    if not path.is_file():
        raise ValueError(f"the train step wrote no {path}; check the training log")
    records = read_metrics(path)
    if not records:
        raise ValueError(f"{path} holds no records; the run did not complete a step")
    last = records[-1]
    out = {"step": float(last["step"]), "loss": float(last["loss"]), "tokens_per_s": float(last["tokens_per_s"])}
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    if evals:
        out["eval_loss"] = float(evals[-1])
    if not all(math.isfinite(v) for v in out.values()):
        raise ValueError(f"{path}: non-finite final metrics {out}; the run diverged")
    return out
