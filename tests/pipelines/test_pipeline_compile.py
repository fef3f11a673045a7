"""Compile the real DAG (components/<step>/kfp_component.py) and check the IR against the contract
in pipelines/pipeline.py: edges, data edges, parameter wiring and defaults, artifact types, placement."""
import inspect

import pytest
import yaml

from linear_moe.pipelines import pipeline as pl
from linear_moe.pipelines import trainjob

# The contract table of pipelines/pipeline.py: (consumer task, input) -> (producer task, output).
DATA_EDGES = {
    ("train-component", "data"): ("tokenize-component", "dataset"),
    ("convert-component", "checkpoint"): ("train-component", "checkpoint"),
    ("convert-component", "dataset"): ("tokenize-component", "dataset"),
    ("evaluate-component", "model"): ("convert-component", "hf_model"),
    ("evaluate-component", "data"): ("tokenize-component", "dataset"),
    ("evaluate-component", "train_metrics"): ("train-component", "checkpoint"),
}
OUTPUT_TYPES = {
    ("comp-tokenize-component", "dataset"): "system.Dataset",
    ("comp-tokenize-component", "stats"): "system.Metrics",
    ("comp-train-component", "checkpoint"): "system.Model",
    ("comp-train-component", "metrics"): "system.Metrics",
    ("comp-convert-component", "hf_model"): "system.Model",
    ("comp-evaluate-component", "metrics"): "system.Metrics",
    ("comp-evaluate-component", "report"): "system.HTML",
    ("comp-evaluate-component", "table"): "system.Markdown",
}


def _compile(path, options=pl.ClusterOptions()):
    pl.compile_pipeline(str(path), options)
    docs = list(yaml.safe_load_all(path.read_text()))
    return docs[0], (docs[1] if len(docs) > 1 else {})


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    return _compile(tmp_path_factory.mktemp("kfp") / "pipeline.yaml")


def test_dag_edges_chain_tokenize_train_convert_evaluate(compiled):
    spec, _ = compiled
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == {f"{s}-component" for s in pl.STEPS}
    edges = {(task, name): (src["taskOutputArtifact"]["producerTask"], src["taskOutputArtifact"]["outputArtifactKey"])
             for task, task_spec in tasks.items()
             for name, src in task_spec.get("inputs", {}).get("artifacts", {}).items()}
    # convert reads the dataset (for its tokenizer/) as "dataset" or "data", both wired to tokenize's output
    convert_inputs = spec["components"]["comp-convert-component"]["inputDefinitions"]["artifacts"]
    (data_name,) = {"data", "dataset"} & set(convert_inputs)
    expected = {(key if key != ("convert-component", "dataset") else ("convert-component", data_name)): value
                for key, value in DATA_EDGES.items()}
    assert edges == expected
    assert "dependentTasks" not in tasks["tokenize-component"]
    for consumer, producer in [("train", "tokenize"), ("convert", "train"), ("evaluate", "convert")]:
        assert f"{producer}-component" in tasks[f"{consumer}-component"]["dependentTasks"]


def test_every_parameter_reaches_the_steps_that_declare_it(compiled):
    """Reference: each component's own input list; a pipeline parameter nobody reads is a dead flag."""
    spec, _ = compiled
    read = set()
    for task, task_spec in spec["root"]["dag"]["tasks"].items():
        declared = spec["components"][task_spec["componentRef"]["name"]]["inputDefinitions"].get("parameters", {})
        wired = task_spec["inputs"].get("parameters", {})
        for name in declared:
            source = pl.ALIASES.get(name, name)
            if source in pl.DEFAULTS:
                assert wired[name] == {"componentInputParameter": source}, (task, name)
                read.add(source)
            else:
                assert name not in wired, (task, name)
    assert read == set(pl.DEFAULTS)


def test_parameter_defaults_and_types(compiled):
    spec, _ = compiled
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert set(params) == set(pl.DEFAULTS)
    kinds = {bool: "BOOLEAN", int: "NUMBER_INTEGER", float: "NUMBER_DOUBLE", str: "STRING"}
    for name, default in pl.DEFAULTS.items():
        assert params[name]["parameterType"] == kinds[type(default)], name
        assert params[name].get("defaultValue", "") == default, name


def test_pipeline_signature_matches_defaults():
    signature = inspect.signature(pl.build_pipeline().pipeline_func)
    assert {name: p.default for name, p in signature.parameters.items()} == pl.DEFAULTS


def test_artifact_types(compiled):
    spec, _ = compiled
    types = {(name, art): value["artifactType"]["schemaTitle"] for name, comp in spec["components"].items()
             for art, value in comp.get("outputDefinitions", {}).get("artifacts", {}).items()}
    assert {key: types[key] for key in OUTPUT_TYPES} == OUTPUT_TYPES
    inputs = {(name, art): value["artifactType"]["schemaTitle"] for name, comp in spec["components"].items()
              for art, value in comp.get("inputDefinitions", {}).get("artifacts", {}).items()}
    assert inputs[("comp-train-component", "data")] == "system.Dataset"
    assert inputs[("comp-evaluate-component", "model")] == "system.Model"


def test_train_component_workspace_defaults_match_the_launcher(compiled):
    """The train task mounts the PVC where the TrainJob pods mount it, under the launcher's names."""
    spec, platform = compiled
    defaults = {name: p.get("defaultValue")
                for name, p in spec["components"]["comp-train-component"]["inputDefinitions"]["parameters"].items()}
    assert defaults["workspace"] == pl.WORKSPACE_MOUNT == trainjob.WORKSPACE
    assert defaults["trainjob_namespace"] == pl.DEFAULTS["trainjob_namespace"] == trainjob.NAMESPACE
    assert defaults["workspace_pvc"] == pl.DEFAULTS["workspace_pvc"] == trainjob.PVC
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    (mount,) = executors["exec-train-component"]["pvcMount"]
    assert mount["mountPath"] == pl.WORKSPACE_MOUNT
    assert mount["pvcNameParameter"] == {"componentInputParameter": "workspace_pvc"}


def test_train_component_leaves_node_resources_to_the_runtime_by_default(compiled):
    """CPU/memory per TrainJob node are pipeline parameters wired to the train step, empty by default
    (as in the launcher), so the TrainJob does not override the runtime's resources unless asked."""
    import dataclasses

    from linear_moe.pipelines import train_step

    spec, _ = compiled
    declared = spec["components"]["comp-train-component"]["inputDefinitions"]["parameters"]
    wired = spec["root"]["dag"]["tasks"]["train-component"]["inputs"]["parameters"]
    target_defaults = {f.name: f.default for f in dataclasses.fields(train_step.TrainJobTarget)}
    builder_defaults = inspect.signature(trainjob.build_trainjob).parameters
    for name in ("cpu_per_node", "memory_per_node"):
        assert declared[name]["parameterType"] == "STRING"
        assert declared[name].get("defaultValue", "") == pl.DEFAULTS[name] == ""
        assert target_defaults[name] == builder_defaults[name].default == ""
        assert wired[name] == {"componentInputParameter": name}


def test_placement_resources_caching_and_gpu(tmp_path):
    options = pl.ClusterOptions()
    options.resources["train"] = pl.Resources(gpus=4)
    spec, platform = _compile(tmp_path / "p.yaml", options)
    train_exec = spec["deploymentSpec"]["executors"]["exec-train-component"]["container"]["resources"]
    assert train_exec["accelerator"]["resourceCount"] == "4"
    assert train_exec["accelerator"]["resourceType"] == "nvidia.com/gpu"
    tok_exec = spec["deploymentSpec"]["executors"]["exec-tokenize-component"]["container"]["resources"]
    assert tok_exec["resourceCpuLimit"] == "4" and "accelerator" not in tok_exec
    assert all(task["cachingOptions"].get("enableCache") for task in spec["root"]["dag"]["tasks"].values())
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert k8s["exec-train-component"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert k8s["exec-train-component"]["nodeSelector"]["labels"] == {"nvidia.com/gpu.present": "true"}
    assert "exec-tokenize-component" not in k8s or "tolerations" not in k8s["exec-tokenize-component"]


def test_every_step_runs_in_the_project_image(compiled):
    from linear_moe.pipelines.images import PROJECT_IMAGE

    spec, _ = compiled
    images = {name: ex["container"]["image"] for name, ex in spec["deploymentSpec"]["executors"].items()}
    assert images == {f"exec-{s}-component": PROJECT_IMAGE for s in pl.STEPS}
