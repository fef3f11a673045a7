"""The KFP v2 DAG: tokenize -> train -> convert -> evaluate.

Contract with the components (``components/<step>/kfp_component.py``, one ``<step>_component`` each):

=========  =========================================================  ============================================
step       input artifacts (<- producer's output)                     output artifacts
=========  =========================================================  ============================================
tokenize   --                                                         ``dataset`` (Dataset), ``stats`` (Metrics)
train      ``data`` <- dataset                                        ``checkpoint`` (Model), ``metrics`` (Metrics)
convert    ``checkpoint``, ``dataset`` (for its tokenizer/)           ``hf_model`` (Model)
evaluate   ``model`` <- hf_model, ``data`` <- dataset,                ``metrics`` (Metrics), ``report`` (HTML),
           ``train_metrics`` <- checkpoint (its metrics.jsonl)        ``table`` (Markdown), ``results`` (Artifact)
=========  =========================================================  ============================================

An input artifact is the upstream output of the same name, or of the name :data:`ARTIFACT_SOURCES` maps
it to.  Each step receives the pipeline parameters it declares, by name or through :data:`ALIASES`
(``corpus`` gets ``data_location``, evaluate's ``limit`` gets ``eval_limit``, ...); a required input
that the pipeline cannot supply fails at compile time, naming the step.  The train component
(:mod:`linear_moe.pipelines.train_step`) trains in-process when ``use_trainjob`` is false (local
runs); in the cluster (true) it copies ``data`` under ``/workspace`` (the PVC mounted on the train
task), runs a TrainJob with ``data_dir``/``output_dir`` there, and copies the finished output
directory into its ``checkpoint`` artifact.
"""

import importlib
from dataclasses import dataclass, field
from typing import Any

from kfp import dsl

from linear_moe.pipelines.images import PROJECT_IMAGE

STEPS = ("tokenize", "train", "convert", "evaluate")
PIPELINE_NAME = "linear-moe"
WORKSPACE_MOUNT = "/workspace"

# Pipeline parameters and their defaults: the embedded default trains the tiny preset on CPU.
DEFAULTS: dict[str, Any] = {
    # model
    "preset": "tiny",
    "lsm_mixer": "gla",
    "layer_pattern": "",
    "model_overrides": "",
    # parallelism and placement of the TrainJob
    "tensor_parallel": 1,
    "pipeline_parallel": 1,
    "expert_parallel": 1,
    "sequence_parallel": 1,
    "nodes": 1,
    "gpus_per_node": 0,
    "cpu_per_node": "",  # Kubernetes quantities per TrainJob node; "" = unset (trainjob.build_trainjob)
    "memory_per_node": "",
    "use_trainjob": False,
    "trainjob_image": PROJECT_IMAGE,
    "trainjob_namespace": "linear-moe",
    "workspace_pvc": "linear-moe-workspace",
    # optimisation
    "steps": 100,
    "seq_length": 128,
    "micro_batch_size": 4,
    "global_batch_size": 8,
    "reset_at_eod": True,
    "lr": 3e-3,
    "seed": 1234,
    "save_interval": 50,
    "eval_interval": 50,
    # data
    "vocab_size": 4096,
    "data_location": "",
    "max_bytes": 0,
    # evaluation
    "eval_tasks": "builtin",
    "eval_limit": 0.0,
    "eval_batch_size": 8,
    "eval_num_samples": 3,
}
# Component input name -> pipeline parameter name, where they differ.
ALIASES = {"corpus": "data_location", "tasks": "eval_tasks", "limit": "eval_limit", "batch_size": "eval_batch_size",
           "num_samples": "eval_num_samples"}
# Component input artifact name -> the upstream output artifact it reads, where they differ.
ARTIFACT_SOURCES = {"data": "dataset", "model": "hf_model", "train_metrics": "checkpoint"}


@dataclass(frozen=True)
class Resources:
    """Requests/limits of one task's container (KFP syntax: "2", "500m", "8G")."""

    cpu_request: str = "1"
    cpu_limit: str = "2"
    memory_request: str = "2G"
    memory_limit: str = "4G"
    gpus: int = 0  # accelerator limit; 0 = none


@dataclass(frozen=True)
class ClusterOptions:
    """Compile-time placement: resources per step, the GPU accelerator, tolerations, node selector."""

    resources: dict[str, Resources] = field(default_factory=lambda: {
        "tokenize": Resources(cpu_request="2", cpu_limit="4", memory_request="4G", memory_limit="8G"),
        "train": Resources(),  # the launcher is light; set gpus > 0 to train in the pipeline pod itself
        "convert": Resources(memory_request="4G", memory_limit="8G"),
        "evaluate": Resources(cpu_request="2", cpu_limit="4", memory_request="4G", memory_limit="8G"),
    })
    accelerator: str = "nvidia.com/gpu"  # resource name used when a step asks for gpus
    gpu_tolerations: tuple[str, ...] = ("nvidia.com/gpu",)  # taint keys tolerated (Exists, NoSchedule)
    gpu_node_selector: dict[str, str] = field(default_factory=lambda: {"nvidia.com/gpu.present": "true"})
    enable_caching: bool = True
    mount_workspace: tuple[str, ...] = ("train",)  # steps that mount the workspace PVC at /workspace


def load_component(step: str):
    """``linear_moe.components.<step>.kfp_component.<step>_component``, with a clear error if absent."""
    module_name = f"linear_moe.components.{step}.kfp_component"
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ImportError(f"pipeline step {step!r} needs {module_name} (components/{step}/kfp_component.py "
                          f"exposing {step}_component): {error}") from error
    try:
        return getattr(module, f"{step}_component")
    except AttributeError:
        raise ImportError(f"{module_name} must define {step}_component (a @dsl.component function)") from None


def _call(step: str, component, params: dict[str, Any], artifacts: dict[str, Any]) -> dsl.PipelineTask:
    """Instantiate ``component`` with the pipeline parameters and upstream artifacts it declares."""
    declared = component.component_spec.inputs or {}
    supplied: dict[str, Any] = {}
    for name in declared:
        source = ALIASES.get(name, name)
        if name in artifacts:
            supplied[name] = artifacts[name]
        elif ARTIFACT_SOURCES.get(name) in artifacts:
            supplied[name] = artifacts[ARTIFACT_SOURCES[name]]
        elif source in params:
            supplied[name] = params[source]
    missing = [name for name, spec in declared.items() if name not in supplied and not spec.optional]
    if missing:
        raise ValueError(f"{step}_component requires inputs {missing} that the pipeline does not provide; "
                         f"it provides parameters {sorted(params)} and artifacts {sorted(artifacts)}")
    return component(**supplied)


def _place(task: dsl.PipelineTask, step: str, options: ClusterOptions, params: dict[str, Any]) -> None:
    """Resources, GPU accelerator + tolerations + node selector, caching and the workspace PVC."""
    from kfp import kubernetes

    res = options.resources.get(step, Resources())
    task.set_cpu_request(res.cpu_request).set_cpu_limit(res.cpu_limit)
    task.set_memory_request(res.memory_request).set_memory_limit(res.memory_limit)
    if res.gpus:
        task.set_accelerator_type(options.accelerator).set_accelerator_limit(res.gpus)
        for key in options.gpu_tolerations:
            kubernetes.add_toleration(task, key=key, operator="Exists", effect="NoSchedule")
        for label, value in options.gpu_node_selector.items():
            kubernetes.add_node_selector(task, label_key=label, label_value=value)
    task.set_caching_options(options.enable_caching)
    if step in options.mount_workspace:
        kubernetes.mount_pvc(task, pvc_name=params["workspace_pvc"], mount_path=WORKSPACE_MOUNT)
    task.set_display_name(step)


def build_pipeline(options: ClusterOptions = ClusterOptions()):
    """The ``@dsl.pipeline`` function for ``options``; its parameters and defaults are :data:`DEFAULTS`."""
    components = {step: load_component(step) for step in STEPS}

    @dsl.pipeline(name=PIPELINE_NAME, description="Linear-MoE: tokenize -> train -> convert -> evaluate")
    def linear_moe_pipeline(
        preset: str = DEFAULTS["preset"],
        lsm_mixer: str = DEFAULTS["lsm_mixer"],
        layer_pattern: str = DEFAULTS["layer_pattern"],
        model_overrides: str = DEFAULTS["model_overrides"],
        tensor_parallel: int = DEFAULTS["tensor_parallel"],
        pipeline_parallel: int = DEFAULTS["pipeline_parallel"],
        expert_parallel: int = DEFAULTS["expert_parallel"],
        sequence_parallel: int = DEFAULTS["sequence_parallel"],
        nodes: int = DEFAULTS["nodes"],
        gpus_per_node: int = DEFAULTS["gpus_per_node"],
        cpu_per_node: str = DEFAULTS["cpu_per_node"],
        memory_per_node: str = DEFAULTS["memory_per_node"],
        use_trainjob: bool = DEFAULTS["use_trainjob"],
        trainjob_image: str = DEFAULTS["trainjob_image"],
        trainjob_namespace: str = DEFAULTS["trainjob_namespace"],
        workspace_pvc: str = DEFAULTS["workspace_pvc"],
        steps: int = DEFAULTS["steps"],
        seq_length: int = DEFAULTS["seq_length"],
        micro_batch_size: int = DEFAULTS["micro_batch_size"],
        global_batch_size: int = DEFAULTS["global_batch_size"],
        reset_at_eod: bool = DEFAULTS["reset_at_eod"],
        lr: float = DEFAULTS["lr"],
        seed: int = DEFAULTS["seed"],
        save_interval: int = DEFAULTS["save_interval"],
        eval_interval: int = DEFAULTS["eval_interval"],
        vocab_size: int = DEFAULTS["vocab_size"],
        data_location: str = DEFAULTS["data_location"],
        max_bytes: int = DEFAULTS["max_bytes"],
        eval_tasks: str = DEFAULTS["eval_tasks"],
        eval_limit: float = DEFAULTS["eval_limit"],
        eval_batch_size: int = DEFAULTS["eval_batch_size"],
        eval_num_samples: int = DEFAULTS["eval_num_samples"],
    ):
        params = dict(locals())
        artifacts: dict[str, Any] = {}
        for step in STEPS:
            task = _call(step, components[step], params, artifacts)
            _place(task, step, options, params)
            for name, output in task.outputs.items():  # the first step to produce a name owns it
                artifacts.setdefault(name, output)

    return linear_moe_pipeline


def compile_pipeline(package_path: str, options: ClusterOptions = ClusterOptions()) -> str:
    """Compile to a KFP IR YAML at ``package_path``; returns the path."""
    from kfp import compiler

    compiler.Compiler().compile(build_pipeline(options), package_path=package_path)
    return package_path
