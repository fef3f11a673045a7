"""The DAG wiring against the component contract in pipelines/pipeline.py, with stub components.

The real components land one by one (test_pipeline_compile.py covers them); these stubs implement the
documented contract so the wiring, the placement settings and run-local are tested now.
"""

import json

import pytest
import yaml
from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Metrics, Model, Output

from linear_moe.pipelines import pipeline as pl
from linear_moe.pipelines.images import PROJECT_IMAGE


@dsl.component(base_image=PROJECT_IMAGE)
def tokenize_component(dataset: Output[Dataset], stats: Output[Metrics], corpus: str = "", vocab_size: int = 4096):
    with open(dataset.path, "w") as f:
        f.write(f"corpus={corpus!r} vocab={vocab_size}")
    stats.log_metric("vocab_size", vocab_size)


@dsl.component(base_image=PROJECT_IMAGE)
def train_component(dataset: Input[Dataset], checkpoint: Output[Model], metrics: Output[Metrics], preset: str,
                    lsm_mixer: str, steps: int, use_trainjob: bool, nodes: int = 1):
    with open(dataset.path) as f:
        data = f.read()
    with open(checkpoint.path, "w") as f:
        f.write(f"{data} preset={preset} mixer={lsm_mixer} steps={steps} trainjob={use_trainjob}")
    metrics.log_metric("steps", steps)


@dsl.component(base_image=PROJECT_IMAGE)
def convert_component(checkpoint: Input[Model], dataset: Input[Dataset], hf_model: Output[Model]):
    with open(checkpoint.path) as f:
        text = f.read()
    with open(hf_model.path, "w") as f:
        f.write("hf:" + text)


@dsl.component(base_image=PROJECT_IMAGE)
def evaluate_component(hf_model: Input[Model], dataset: Input[Dataset], metrics: Output[Metrics], report: Output[HTML]):
    with open(hf_model.path) as f:
        text = f.read()
    metrics.log_metric("chars", len(text))
    with open(report.path, "w") as f:
        f.write("<pre>" + text + "</pre>")


STUBS = {"tokenize": tokenize_component, "train": train_component, "convert": convert_component,
         "evaluate": evaluate_component}


@pytest.fixture
def stubbed(monkeypatch):
    monkeypatch.setattr(pl, "load_component", lambda step: STUBS[step])


def _compile(tmp_path, options=pl.ClusterOptions()):
    path = tmp_path / "pipeline.yaml"
    pl.compile_pipeline(str(path), options)
    docs = list(yaml.safe_load_all(path.read_text()))
    return docs[0], (docs[1] if len(docs) > 1 else {})


def _producer(task_spec, artifact):
    return task_spec["inputs"]["artifacts"][artifact]["taskOutputArtifact"]


def test_dag_edges_follow_the_contract(stubbed, tmp_path):
    spec, _ = _compile(tmp_path)
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == {f"{s}-component" for s in pl.STEPS}
    assert _producer(tasks["train-component"], "dataset") == {"producerTask": "tokenize-component",
                                                              "outputArtifactKey": "dataset"}
    assert _producer(tasks["convert-component"], "checkpoint") == {"producerTask": "train-component",
                                                                   "outputArtifactKey": "checkpoint"}
    assert _producer(tasks["evaluate-component"], "hf_model") == {"producerTask": "convert-component",
                                                                  "outputArtifactKey": "hf_model"}
    assert _producer(tasks["evaluate-component"], "dataset")["producerTask"] == "tokenize-component"
    assert tasks["tokenize-component"]["inputs"]["parameters"]["corpus"] == {"componentInputParameter": "data_location"}


def test_parameter_defaults_are_the_pipeline_defaults(stubbed, tmp_path):
    spec, _ = _compile(tmp_path)
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert set(params) == set(pl.DEFAULTS)
    kinds = {bool: "BOOLEAN", int: "NUMBER_INTEGER", str: "STRING"}
    for name, default in pl.DEFAULTS.items():
        assert params[name]["parameterType"] == kinds[type(default)], name
        assert params[name].get("defaultValue", "") == default, name


def test_artifact_types(stubbed, tmp_path):
    spec, _ = _compile(tmp_path)
    outputs = {name: comp["outputDefinitions"]["artifacts"] for name, comp in spec["components"].items()}
    types = {(comp, art): value["artifactType"]["schemaTitle"] for comp, arts in outputs.items()
             for art, value in arts.items()}
    assert types[("comp-tokenize-component", "dataset")] == "system.Dataset"
    assert types[("comp-train-component", "checkpoint")] == "system.Model"
    assert types[("comp-convert-component", "hf_model")] == "system.Model"
    assert types[("comp-evaluate-component", "metrics")] == "system.Metrics"
    assert types[("comp-evaluate-component", "report")] == "system.HTML"


def test_placement_resources_caching_pvc_and_gpu(stubbed, tmp_path):
    options = pl.ClusterOptions()
    options.resources["train"] = pl.Resources(gpus=4)
    spec, platform = _compile(tmp_path, options)
    train_exec = spec["deploymentSpec"]["executors"]["exec-train-component"]["container"]["resources"]
    assert train_exec["accelerator"]["resourceCount"] == "4"
    assert train_exec["accelerator"]["resourceType"] == "nvidia.com/gpu"
    tok_exec = spec["deploymentSpec"]["executors"]["exec-tokenize-component"]["container"]["resources"]
    assert tok_exec["resourceCpuLimit"] == "4" and "accelerator" not in tok_exec
    assert all(task["cachingOptions"].get("enableCache") for task in spec["root"]["dag"]["tasks"].values())
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    train_k8s = k8s["exec-train-component"]
    assert train_k8s["pvcMount"][0]["mountPath"] == "/workspace"
    assert train_k8s["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert train_k8s["nodeSelector"]["labels"] == {"nvidia.com/gpu.present": "true"}
    assert "exec-tokenize-component" not in k8s or "tolerations" not in k8s["exec-tokenize-component"]


def test_missing_contract_input_fails_at_compile_naming_the_step(monkeypatch, tmp_path):
    @dsl.component(base_image=PROJECT_IMAGE)
    def convert_component(weights: Input[Model], hf_model: Output[Model]):
        pass

    monkeypatch.setattr(pl, "load_component", lambda step: {**STUBS, "convert": convert_component}[step])
    with pytest.raises(ValueError, match=r"convert_component requires inputs \['weights'\]"):
        _compile(tmp_path)


def test_missing_component_module_names_the_file():
    with pytest.raises(ImportError, match="components/nosuchstep/kfp_component.py"):
        pl.load_component("nosuchstep")


def test_run_local_passes_parameters_through_every_step(stubbed, tmp_path):
    """Reference: the stubs record what each step received; the final report must hold all of it."""
    from linear_moe.pipelines.local import run_local

    run_dir = run_local({**pl.DEFAULTS, "data_location": "corpus-dir", "steps": 3, "lsm_mixer": "deltanet"},
                        tmp_path / "root")
    text = (run_dir / "evaluate-component" / "report").read_text()
    assert text == "<pre>hf:corpus='corpus-dir' vocab=4096 preset=tiny mixer=deltanet steps=3 trainjob=False</pre>"
    executor_output = json.loads((run_dir / "evaluate-component" / "executor_output.json").read_text())
    (metrics,) = executor_output["artifacts"]["metrics"]["artifacts"]
    assert metrics["metadata"] == {"chars": len(text) - len("<pre></pre>")}


def test_run_local_refuses_trainjob():
    from linear_moe.pipelines.local import run_local

    with pytest.raises(ValueError, match="use_trainjob"):
        run_local({**pl.DEFAULTS, "use_trainjob": True})
