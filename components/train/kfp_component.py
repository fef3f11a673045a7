"""KFP v2 component of the train step: artifact paths -> :func:`linear_moe.pipelines.train_step.run_train_step`.

Heavy imports live inside the function body (KFP runs the body in the project image), so importing
this module to compile a pipeline stays fast.  Defaults are literals: KFP re-executes the body's source
in the container, where module-level names of this file do not exist.
"""
from kfp import dsl

from linear_moe.pipelines.images import PROJECT_IMAGE


@dsl.component(base_image=PROJECT_IMAGE)
def train_component(
    data: dsl.Input[dsl.Dataset],
    checkpoint: dsl.Output[dsl.Model],
    metrics: dsl.Output[dsl.Metrics],
    preset: str = "tiny",
    lsm_mixer: str = "",
    layer_pattern: str = "",
    model_overrides: str = "",
    vocab_size: int = 0,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    expert_parallel: int = 1,
    sequence_parallel: int = 1,
    steps: int = 100,
    seq_length: int = 128,
    micro_batch_size: int = 4,
    global_batch_size: int = 8,
    reset_at_eod: bool = True,
    lr: float = 3e-3,
    seed: int = 1234,
    save_interval: int = 50,
    eval_interval: int = 50,
    use_trainjob: bool = False,
    nodes: int = 1,
    gpus_per_node: int = 0,
    cpu_per_node: str = "",
    memory_per_node: str = "",
    trainjob_image: str = "",
    trainjob_namespace: str = "linear-moe",
    workspace_pvc: str = "linear-moe-workspace",
    workspace: str = "/workspace",
):
    """Train on ``data`` (tokenize output dir) into ``checkpoint`` (checkpoints/, metrics.jsonl,
    model_config.json, train_config.json); log the final loss, eval_loss and tokens_per_s to ``metrics``.

    ``model_overrides`` is a JSON object of ModelConfig fields; ``vocab_size`` (0 = the preset's),
    ``lsm_mixer`` and ``layer_pattern`` ("" = the preset's) override it in that order.  The cosine
    schedule decays from ``lr`` to ``lr / 10``.  With ``use_trainjob`` the run is a Kubeflow Trainer
    TrainJob of ``nodes`` x ``gpus_per_node`` that shares the ``workspace_pvc`` mounted at ``workspace``;
    ``cpu_per_node`` / ``memory_per_node`` (Kubernetes quantities, "" = unset, see
    :func:`linear_moe.pipelines.trainjob.build_trainjob`) size each node, and ``trainjob_image`` "" = the
    project image.
    """
    import hashlib

    from linear_moe.pipelines.images import PROJECT_IMAGE
    from linear_moe.pipelines.train_step import TrainJobTarget, run_train_step, train_config

    config = train_config(locals(), data_dir=data.path)  # the parameters are the pipeline's argument names
    target = None
    if use_trainjob:
        # The artifact URI is unique per task execution and stable across pod retries (which then resume).
        name = "linear-moe-train-" + hashlib.sha1(checkpoint.uri.encode()).hexdigest()[:10]
        target = TrainJobTarget(name=name, image=trainjob_image or PROJECT_IMAGE, nodes=nodes,
                                gpus_per_node=gpus_per_node, cpu_per_node=cpu_per_node,
                                memory_per_node=memory_per_node, namespace=trainjob_namespace, pvc=workspace_pvc,
                                workspace=workspace)
    for key, value in run_train_step(config, checkpoint.path, target).items():
        metrics.log_metric(key, value)
    checkpoint.metadata["preset"] = preset
    checkpoint.metadata["model_overrides"] = config.model_overrides
