"""Compile-time failures of the DAG wiring: a component that breaks the contract, a missing module."""
import pytest
from kfp import dsl
from kfp.dsl import Input, Model, Output

from linear_moe.pipelines import pipeline as pl
from linear_moe.pipelines.images import PROJECT_IMAGE


def test_missing_contract_input_fails_at_compile_naming_the_step(monkeypatch, tmp_path):
    @dsl.component(base_image=PROJECT_IMAGE)
    def convert_component(weights: Input[Model], hf_model: Output[Model]):
        pass

    real = pl.load_component
    monkeypatch.setattr(pl, "load_component", lambda step: convert_component if step == "convert" else real(step))
    with pytest.raises(ValueError, match=r"convert_component requires inputs \['weights'\]"):
        pl.compile_pipeline(str(tmp_path / "pipeline.yaml"))


def test_missing_component_module_names_the_file():
    with pytest.raises(ImportError, match="components/nosuchstep/kfp_component.py"):
        pl.load_component("nosuchstep")


def test_run_local_refuses_trainjob():
    from linear_moe.pipelines.local import run_local

    with pytest.raises(ValueError, match="use_trainjob"):
        run_local({**pl.DEFAULTS, "use_trainjob": True})
