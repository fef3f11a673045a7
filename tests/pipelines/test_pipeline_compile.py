"""Compile the real DAG (components/<step>/kfp_component.py) and check it against the contract.

Skipped only while the train component (and so the rest of the chain) is not importable yet.
"""
import importlib.util

import pytest
import yaml

from linear_moe.pipelines import pipeline as pl


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


pytestmark = pytest.mark.skipif(not _importable("linear_moe.components.train.kfp_component"),
                                reason="linear_moe.components.train.kfp_component is not written yet")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    path = tmp_path_factory.mktemp("kfp") / "pipeline.yaml"
    pl.compile_pipeline(str(path))
    docs = list(yaml.safe_load_all(path.read_text()))
    return docs[0], (docs[1] if len(docs) > 1 else {})


def _upstream(task_spec) -> set[str]:
    producers = {a["taskOutputArtifact"]["producerTask"] for a in task_spec.get("inputs", {}).get("artifacts", {}).values()
                 if "taskOutputArtifact" in a}
    return producers | set(task_spec.get("dependentTasks", []))


def test_dag_edges_chain_tokenize_train_convert_evaluate(compiled):
    spec, _ = compiled
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == {f"{s}-component" for s in pl.STEPS}
    assert _upstream(tasks["tokenize-component"]) == set()
    assert "tokenize-component" in _upstream(tasks["train-component"])
    assert "train-component" in _upstream(tasks["convert-component"])
    assert "convert-component" in _upstream(tasks["evaluate-component"])


def test_parameter_defaults(compiled):
    spec, _ = compiled
    params = spec["root"]["inputDefinitions"]["parameters"]
    for name, default in pl.DEFAULTS.items():
        assert params[name].get("defaultValue", "") == default, name


def test_artifact_types(compiled):
    spec, _ = compiled
    types = {(name, art): value["artifactType"]["schemaTitle"] for name, comp in spec["components"].items()
             for art, value in comp.get("outputDefinitions", {}).get("artifacts", {}).items()}
    assert types[("comp-tokenize-component", "dataset")] == "system.Dataset"
    assert types[("comp-train-component", "checkpoint")] == "system.Model"
    assert types[("comp-convert-component", "hf_model")] == "system.Model"
    assert types[("comp-evaluate-component", "metrics")] == "system.Metrics"


def test_train_step_mounts_the_workspace(compiled):
    _, platform = compiled
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert executors["exec-train-component"]["pvcMount"][0]["mountPath"] == pl.WORKSPACE_MOUNT
