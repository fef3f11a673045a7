"""pipelines/train_step.py: TrainJob command round trip through the train CLI, overrides, final metrics."""
import json

import pytest

from linear_moe.components.train import TrainConfig
from linear_moe.pipelines import train_step, trainjob


def test_trainjob_command_parses_back_to_the_same_config(valid_mixer):
    """Reference: the train CLI's own parser reads the pods' command back into a TrainConfig."""
    from linear_moe.components.train.__main__ import config_from_args

    config = TrainConfig(preset="tiny", model_overrides={"lsm_mixer": valid_mixer, "layer_pattern": "LA", "num_layers": 2,
                                                         "vocab_size": 300, "hidden_size": 32, "moe_top_k": 1},
                         data_dir="/workspace/j/data", output_dir="/workspace/j/train", seq_length=48,
                         micro_batch_size=3, global_batch_size=12, steps=9, lr=1.5e-3, min_lr=1e-5, warmup_steps=2,
                         weight_decay=0.0, adam_beta2=0.99, grad_clip=0.5, seed=99, tensor_parallel=2,
                         expert_parallel=2, eval_interval=3, eval_iters=2, save_interval=4, resume=True,
                         log_interval=2, dvclive=False)
    overrides = config.model_overrides
    command = trainjob.train_command(config.preset, lsm_mixer=overrides["lsm_mixer"],
                                     layer_pattern=overrides["layer_pattern"],
                                     layout=trainjob.ParallelLayout(tensor_parallel=2, expert_parallel=2),
                                     steps=config.steps, seq_length=config.seq_length, data_dir=config.data_dir,
                                     output_dir=config.output_dir, extra_args=train_step.extra_train_flags(config))
    assert config_from_args(command[3:]) == config


@pytest.mark.parametrize("cpu,memory,gpus", [("", "", 0), ("32", "400Gi", 8)], ids=["runtime-default", "sized"])
def test_prepare_trainjob_sizes_nodes_from_the_target(monkeypatch, valid_mixer, cpu, memory, gpus):
    """The target's CPU/memory reach the manifest; left empty, the runtime's own resources apply."""
    monkeypatch.setattr(trainjob, "connect", lambda kubeconfig=None: "api")
    config = TrainConfig(model_overrides={"lsm_mixer": valid_mixer}, data_dir="/workspace/j/data",
                         output_dir="/workspace/j/train", micro_batch_size=1, global_batch_size=8)
    target = train_step.TrainJobTarget(name="lm-run", image="img:1", gpus_per_node=gpus, cpu_per_node=cpu,
                                       memory_per_node=memory)
    manifest, api = train_step.prepare_trainjob(config, target)
    assert api == "api"
    resources = manifest["spec"]["trainer"].get("resourcesPerNode")
    if gpus:
        assert resources == {"requests": {"cpu": cpu, "memory": memory},
                             "limits": {"cpu": cpu, "memory": memory, "nvidia.com/gpu": gpus}}
    else:
        assert resources is None


def test_prepare_trainjob_rejects_a_bad_quantity_before_connecting(monkeypatch, valid_mixer):
    def no_cluster(*args, **kwargs):
        raise AssertionError("connect() must not be reached when the request is invalid")

    monkeypatch.setattr(trainjob, "connect", no_cluster)
    config = TrainConfig(model_overrides={"lsm_mixer": valid_mixer})
    target = train_step.TrainJobTarget(name="lm-run", image="img:1", cpu_per_node="abc")
    with pytest.raises(ValueError, match="cpu_per_node 'abc'"):
        train_step.prepare_trainjob(config, target)


def test_model_overrides_later_sources_win():
    overrides = train_step.model_overrides('{"vocab_size": 512, "hidden_size": 32, "lsm_mixer": "x"}',
                                           lsm_mixer="gla", layer_pattern="LLA", vocab_size=300)
    assert overrides == {"vocab_size": 512, "hidden_size": 32, "lsm_mixer": "gla", "layer_pattern": "LLA",
                         "num_layers": 3}
    assert train_step.model_overrides("") == {}
    with pytest.raises(ValueError, match="JSON object"):
        train_step.model_overrides("[1, 2]")


def test_final_metrics_take_the_last_record_and_last_eval(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"step": 1, "loss": 3.0, "tokens_per_s": 10.0, "eval_loss": 3.5},
               {"step": 2, "loss": 2.5, "tokens_per_s": 12.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert train_step.final_metrics(path) == {"step": 2.0, "loss": 2.5, "tokens_per_s": 12.0, "eval_loss": 3.5}
    path.write_text(json.dumps({"step": 1, "loss": float("nan"), "tokens_per_s": 1.0}) + "\n")
    with pytest.raises(ValueError, match="diverged"):
        train_step.final_metrics(path)
    with pytest.raises(ValueError, match="wrote no"):
        train_step.final_metrics(tmp_path / "missing.jsonl")
