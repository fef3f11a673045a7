"""The train component: kill-and-resume equivalence, bad-input errors, schedule, CLI."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from linear_moe.components.train import TrainConfig
from linear_moe.components.train.checkpoint import COMMIT_DELAY_ENV, latest_complete
from linear_moe.components.train.loop import preflight
from linear_moe.components.train.metrics import read_metrics
from linear_moe.components.train.schedule import lr_at

TRAIN = [sys.executable, "-m", "linear_moe.components.train"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    from linear_moe.components.tokenize import tokenize

    out = tmp_path_factory.mktemp("tokenized") / "data"
    tokenize(out, vocab_size=300, max_bytes=300_000, doc_chars=400, progress=False)  # documents of ~150 tokens
    return out


def run_args(data_dir: Path, output_dir: Path, steps: int, **extra) -> list[str]:
    args = ["--data-dir", str(data_dir), "--output-dir", str(output_dir), "--preset", "tiny", "--steps", str(steps),
            "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "4", "--save-interval", "2",
            "--eval-interval", "0", "--warmup-steps", "2", "--no-dvclive", "--model", "lsm_mixer=gated_deltanet"]
    for key, value in extra.items():
        flag = f"--{key.replace('_', '-')}"
        args += [flag] if value is True else [flag, str(value)]
    return args


def losses(output_dir: Path) -> dict[int, float]:
    return {record["step"]: record["loss"] for record in read_metrics(output_dir / "metrics.jsonl")}


@pytest.mark.e2e
def test_kill_during_checkpoint_then_resume_matches_uninterrupted_run(data_dir, tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    reference = tmp_path / "reference"
    subprocess.run(TRAIN + run_args(data_dir, reference, 4), check=True, env=env, capture_output=True)

    killed = tmp_path / "killed"
    process = subprocess.Popen(TRAIN + run_args(data_dir, killed, 4), env={**env, COMMIT_DELAY_ENV: "120"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = killed / "checkpoints" / "step_0000004.partial"
    deadline = time.time() + 300
    while not (partial / "optimizer").exists() or not any((partial / "optimizer").glob("*.json")):
        assert process.poll() is None, "the run ended before it wrote the second checkpoint"
        assert time.time() < deadline, "timed out waiting for the second checkpoint"
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert latest_complete(killed / "checkpoints").name == "step_0000002"  # the partial one is not taken

    subprocess.run(TRAIN + run_args(data_dir, killed, 4, resume=True), check=True, env=env, capture_output=True)
    expected, resumed = losses(reference), losses(killed)
    # the killed run had logged steps 3 and 4 past its last checkpoint: the resume replaces them
    assert [record["step"] for record in read_metrics(killed / "metrics.jsonl")] == [1, 2, 3, 4]
    for step in (3, 4):
        assert math.isclose(resumed[step], expected[step], rel_tol=1e-6), (step, resumed[step], expected[step])
    assert latest_complete(killed / "checkpoints").name == "step_0000004"
    assert not partial.exists()


def config(data_dir, tmp_path, **fields) -> TrainConfig:
    return TrainConfig(data_dir=str(data_dir), output_dir=str(tmp_path / "run"), preset="tiny", **fields)


def committed_checkpoint(data_dir, tmp_path) -> Path:
    """A step-2 checkpoint of ``config(data_dir, tmp_path)``'s model, as complete as preflight can tell."""
    checkpoint = tmp_path / "run" / "checkpoints" / "step_0000002"
    (checkpoint / "model").mkdir(parents=True)
    saved = config(data_dir, tmp_path).model_config().to_dict()
    (checkpoint / "train_state.json").write_text(json.dumps({"step": 2, "model_config": saved}))
    return checkpoint


def test_missing_dataset_is_named(tmp_path):
    with pytest.raises(ValueError, match="tokenizer.json is missing"):
        preflight(config(tmp_path / "nowhere", tmp_path), 1)


def test_corrupt_dataset_is_named(data_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(data_dir, broken)
    with open(broken / "train.bin", "r+b") as handle:
        handle.truncate(100)
    with pytest.raises(ValueError, match="train.bin is corrupt"):
        preflight(config(broken, tmp_path), 1)
    (broken / "train.idx").write_bytes(b"not an index")
    with pytest.raises(ValueError, match="train.idx is corrupt"):
        preflight(config(broken, tmp_path), 1)


def test_tokenizer_larger_than_model_vocab_is_rejected(data_dir, tmp_path):
    with pytest.raises(ValueError, match="vocab_size is 256"):
        preflight(config(data_dir, tmp_path, model_overrides={"vocab_size": 256}), 1)


@pytest.mark.parametrize("world, sizes, match", [
    (3, dict(tensor_parallel=2), "not divisible by tensor_parallel=2"),
    (4, dict(tensor_parallel=2, pipeline_parallel=4), "not divisible"),
    (2, dict(expert_parallel=4), "expert_parallel=4 must divide data_parallel x sequence_parallel = 2"),
    (2, dict(tensor_parallel=2, expert_parallel=2), "expert_parallel=2 must divide data_parallel x sequence_parallel = 1"),
    (2, dict(global_batch_size=6, micro_batch_size=2), "global_batch_size=6"),
])
def test_world_size_that_parallel_sizes_do_not_divide(data_dir, tmp_path, world, sizes, match):
    with pytest.raises(ValueError, match=match):
        preflight(config(data_dir, tmp_path, **sizes), world)


class _GroupsWouldBeCreated(Exception):
    """Raised in place of megatron's first ``create_group``: every size check has passed by then."""


def _megatron_accepts(world: int, tp: int, pp: int, ep: int, sp: int) -> bool:
    """Whether megatron-core's own ``initialize_model_parallel`` accepts these sizes for ``world`` ranks.

    It runs with a faked world (no processes) up to the point where it would build process groups.
    """
    from unittest import mock

    from megatron.core import parallel_state

    def created(*args, **kwargs):
        raise _GroupsWouldBeCreated

    with mock.patch.object(torch.distributed, "is_initialized", return_value=True), \
            mock.patch.object(torch.distributed, "get_world_size", return_value=world), \
            mock.patch.object(torch.distributed, "get_rank", return_value=0), \
            mock.patch.object(parallel_state, "_DATA_PARALLEL_GROUP", None), \
            mock.patch.object(parallel_state, "create_group", created):
        try:
            parallel_state.initialize_model_parallel(
                tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, expert_model_parallel_size=ep,
                context_parallel_size=sp)
        except _GroupsWouldBeCreated:
            return True
        except RuntimeError:  # its size checks: "world_size (...) is not divisible by ..."
            return False
    raise AssertionError("initialize_model_parallel returned without creating a process group")


def test_parallel_size_rule_is_megatrons():
    """Reference: megatron-core's ``initialize_model_parallel`` itself, over a grid of sizes."""
    import itertools

    from linear_moe.components.train.config import data_parallel_size

    def accepts(world, tp, pp, ep, sp) -> bool:
        try:
            dp = data_parallel_size(world, tensor_parallel=tp, pipeline_parallel=pp, expert_parallel=ep,
                                    sequence_parallel=sp)
        except ValueError:
            return False
        assert dp * tp * pp * sp == world
        return True

    verdicts = {sizes: accepts(*sizes)
                for sizes in itertools.product([1, 2, 3, 4, 6, 8, 16], [1, 2, 4], [1, 2], [1, 2, 4, 8], [1, 2, 4])}
    for sizes, ours in verdicts.items():
        assert ours == _megatron_accepts(*sizes), f"(world, tp, pp, ep, sp) = {sizes}: ours accepts={ours}"
    assert 0 < sum(verdicts.values()) < len(verdicts)


def test_checkpoint_of_another_model_is_rejected(data_dir, tmp_path):
    committed_checkpoint(data_dir, tmp_path)
    with pytest.raises(ValueError, match="hidden_size: checkpoint=64 vs run=32"):
        preflight(config(data_dir, tmp_path, resume=True, model_overrides={"hidden_size": 32}), 1)


def test_partial_checkpoints_are_never_taken_as_complete(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "step_0000002").mkdir(parents=True)
    (root / "step_0000002" / "train_state.json").write_text("{}")
    (root / "step_0000004.partial").mkdir()
    (root / "step_0000006").mkdir()  # no train_state.json: never committed
    assert latest_complete(root).name == "step_0000002"


def test_lr_schedule_warms_up_then_decays_to_min():
    kwargs = dict(lr=1.0, min_lr=0.1, warmup_steps=4, total_steps=20)
    values = [lr_at(step, **kwargs) for step in range(20)]
    assert values[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(values[3:], values[4:]))
    assert math.isclose(lr_at(20, **kwargs), 0.1)
    assert math.isclose(lr_at(12, **kwargs), 0.1 + 0.45 * (1 + math.cos(math.pi * 8 / 16)))


def test_cli_help_explains_every_option():
    """Every TrainConfig field is a flag, shown with the comment that documents it in config.py."""
    import dataclasses

    from linear_moe.components.train.config import TrainConfig

    out = " ".join(subprocess.run(TRAIN + ["--help"], check=True, capture_output=True, text=True).stdout.split())
    for field in dataclasses.fields(TrainConfig):
        flag = "--model" if field.name == "model_overrides" else "--" + field.name.replace("_", "-")
        assert flag + " " in out or flag + "," in out, flag
    assert "global gradient-norm clip (0 disables)" in out
    assert "each layer's sequence mixer, from its input" in out


@pytest.mark.e2e
@pytest.mark.distributed
@pytest.mark.xdist_group("dist")
@pytest.mark.parametrize("extra, both", [([], []), (["--tensor-parallel", "2"], []), (["--sequence-parallel", "2"], []),
                                         (["--sequence-parallel", "2"], ["--reset-at-eod"]),
                                         # stage 0 has no MoE layer, so its ranks log no router loss
                                         (["--pipeline-parallel", "2"], ["--model", "layer_pattern=lA"])],
                         ids=["dp2", "tp2", "sp2", "sp2-reset-at-eod", "pp2-moe-free-stage"])
def test_torchrun_two_processes_match_single_process_losses(data_dir, tmp_path, extra, both):
    """The whole CLI under torchrun (data sharding, loss reduction, multi-rank checkpoints) equals one process;
    with --reset-at-eod documents cross the two SP ranks' boundary."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    args = run_args(data_dir, tmp_path / "single", 3) + ["--global-batch-size", "8"] + both
    subprocess.run(TRAIN + args, check=True, env=env, capture_output=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "-m", "linear_moe.components.train"]
    args = run_args(data_dir, tmp_path / "double", 3) + ["--global-batch-size", "8"] + extra + both
    proc = subprocess.run(torchrun + args, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single, double = losses(tmp_path / "single"), losses(tmp_path / "double")
    assert sorted(double) == [1, 2, 3]
    for step in single:
        assert math.isclose(double[step], single[step], rel_tol=1e-5), (step, double[step], single[step])
    assert latest_complete(tmp_path / "double" / "checkpoints").name == "step_0000003"


def test_reset_at_eod_gives_each_batch_its_document_offsets_and_changes_the_losses(data_dir, tmp_path):
    """The flag reaches the model: the batches carry the offsets of their EOD tokens (counted here
    directly), and the same run without them trains on other losses. (That the offsets make packed
    documents equal separate runs is tests/model/megatron/test_packed_documents.py.)"""
    from linear_moe.components.train.data import build_datasets, microbatches, read_tokenizer_info

    tokenizer = read_tokenizer_info(data_dir)
    train_ds, _ = build_datasets(data_dir, seq_length=32, seed=1234, train_samples=8, valid_samples=0,
                                 cache_dir=tmp_path / "cache", tokenizer=tokenizer)
    batches = microbatches(train_ds, step=0, global_batch_size=4, micro_batch_size=2, dp_rank=0, dp_size=1,
                           eod=tokenizer.eod)
    inner_starts = 0
    for batch in batches:
        tokens = batch["tokens"]
        expected = sorted({0, 32, 64} | {b * 32 + p + 1 for b, p in (tokens[:, :-1] == tokenizer.eod).nonzero().tolist()})
        assert batch["cu_seqlens"].tolist() == expected
        inner_starts += len(expected) - 3
    assert inner_starts > 0, "step 0 holds no document boundary inside a sample: the comparison below means nothing"
    for name, extra in (("reset", ["--reset-at-eod"]), ("plain", [])):
        subprocess.run(TRAIN + run_args(data_dir, tmp_path / name, 1) + extra, check=True, capture_output=True)
    reset, plain = losses(tmp_path / "reset"), losses(tmp_path / "plain")
    assert abs(reset[1] - plain[1]) > 1e-4 * abs(plain[1]), (reset, plain)


def test_fresh_run_into_a_directory_with_checkpoints_is_refused(data_dir, tmp_path):
    checkpoint = committed_checkpoint(data_dir, tmp_path)
    with pytest.raises(ValueError, match="already holds checkpoints .*--resume"):
        preflight(config(data_dir, tmp_path), 1)
    assert preflight(config(data_dir, tmp_path, resume=True), 1)[2] == checkpoint


def test_eval_without_iterations_is_a_config_error(data_dir, tmp_path):
    with pytest.raises(ValueError, match="eval_iters"):
        config(data_dir, tmp_path, eval_iters=0, eval_interval=10)
    config(data_dir, tmp_path, eval_iters=0, eval_interval=0)  # disabled evaluation is fine


def test_unknown_optimizer_is_a_config_error(data_dir, tmp_path):
    with pytest.raises(ValueError, match="TrainConfig.optimizer: 'sgd' not in"):
        config(data_dir, tmp_path, optimizer="sgd")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal of the GPU-only options")
def test_gpu_only_options_without_cuda_are_refused_before_start(data_dir, tmp_path):
    with pytest.raises(ValueError, match="optimizer='megatron' needs CUDA"):
        preflight(config(data_dir, tmp_path, optimizer="megatron"), 1)
    assert preflight(config(data_dir, tmp_path), 1)[2] is None  # the default, torch AdamW, runs anywhere
    assert not config(data_dir, tmp_path).uses_distributed_optimizer()
    with pytest.raises(ValueError, match="moe_grouped_gemm=True needs bf16"):
        preflight(config(data_dir, tmp_path, moe_grouped_gemm=True), 1)


def test_optimizer_state_of_another_optimizer_is_named(tmp_path):
    """A torch-AdamW resume from a directory without its per-rank files says which optimizer wrote it."""
    import torch.distributed as dist

    from linear_moe.components.train.optim import TorchAdamW

    model = torch.nn.Linear(3, 2)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # a world of one: no rendezvous
    try:
        with pytest.raises(ValueError, match="rank_00000.safetensors is missing.*optimizer='megatron'"):
            TorchAdamW([model], TrainConfig()).load(tmp_path, [model])
    finally:
        dist.destroy_process_group()


def test_bf16_parameters_track_fp32_training():
    """The GPU precision path on CPU: bf16 parameters inside megatron's Float16Module, fp32 gradient
    reduction, torch AdamW. Over 4 steps its losses stay within 2e-2 (relative) of the fp32 run's."""
    from linear_moe.components.train.data import random_batches
    from linear_moe.components.train.distributed import world_of_one
    from linear_moe.components.train.optim import build_optimizer
    from linear_moe.components.train.step import TrainingModel

    cfg = TrainConfig(preset="tiny", model_overrides=dict(layer_pattern="LA", num_layers=2, lsm_mixer="gla"),
                      lr=3e-3, min_lr=3e-3, seq_length=32, micro_batch_size=2, global_batch_size=2, seed=0)
    (batch,) = random_batches(1, batch_size=2, seq_length=32, vocab_size=256, generator=torch.Generator().manual_seed(0))
    losses = {}
    with world_of_one():
        for dtype in (torch.float32, torch.bfloat16):
            model = TrainingModel.from_config(cfg, params_dtype=dtype)
            assert model.config.bf16 == (dtype == torch.bfloat16)
            assert {p.dtype for p in model.parameters()} == {dtype}
            optimizer = build_optimizer(model.chunks, cfg)
            losses[dtype] = torch.tensor([model.train_step([batch], optimizer)[0] for _ in range(4)])
    fp32, bf16 = losses[torch.float32], losses[torch.bfloat16]
    assert fp32[-1] < fp32[0] - 0.5  # the run learns, so "tracks" means something
    assert float((bf16 - fp32).abs().max() / fp32.abs().max()) <= 2e-2, (fp32, bf16)


@pytest.mark.parametrize("fields, match", [
    ({"seq_length": "32"}, r"TrainConfig.seq_length is '32' \(str\), expected an integer"),
    ({"resume": "no"}, r"TrainConfig.resume is 'no' \(str\), expected true/false"),
    ({"lr": None}, r"TrainConfig.lr is None \(NoneType\), expected a number"),
    ({"model_overrides": {"num_heads": "4"}}, r"ModelConfig.num_heads is '4' \(str\), expected an integer"),
    ({"model_overrides": {"tie_word_embeddings": 1}}, r"ModelConfig.tie_word_embeddings is 1 \(int\), expected true/false"),
])
def test_values_of_the_wrong_type_name_the_field(fields, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig.from_dict(fields)


def test_sequence_balance_loss_over_packed_micro_batches_is_refused():
    seq = {"moe_aux_loss_type": "seq_aux_loss"}
    with pytest.raises(ValueError, match="TrainConfig.reset_at_eod: runs each micro-batch as one packed sequence"):
        TrainConfig(reset_at_eod=True, micro_batch_size=2, global_batch_size=2, model_overrides=seq)
    TrainConfig(reset_at_eod=True, micro_batch_size=1, global_batch_size=2, model_overrides=seq)  # one sample each
    TrainConfig(reset_at_eod=False, micro_batch_size=2, global_batch_size=2, model_overrides=seq)
    TrainConfig(reset_at_eod=True, micro_batch_size=2, global_batch_size=2,  # no MoE layer: nothing to balance
                model_overrides={**seq, "layer_pattern": "ll"})


def test_numbers_fit_float_fields():
    model = TrainConfig.from_dict({"lr": 1, "model_overrides": {"expand_v": 2, "moe_capacity_factor": None}})
    assert model.lr == 1 and model.model_config().value_dim == 2 * model.model_config().head_dim


@pytest.mark.parametrize("name, text", [("bad.json", '{"steps": 3,}'), ("bad.yaml", "steps: [3\n")])
def test_config_file_with_bad_syntax_is_named(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=f"training config file {path} is not valid"):
        TrainConfig.from_file(path)


def test_seq_length_longer_than_the_training_split_is_rejected(data_dir, tmp_path):
    with pytest.raises(ValueError, match=r"seq_length=1000000 needs 1000001 tokens per sample but the training split"):
        preflight(config(data_dir, tmp_path, seq_length=1_000_000), 1)


def test_cli_reports_input_errors_without_a_traceback(tmp_path, capsys):
    from linear_moe.components.train.__main__ import main

    assert main(["--data-dir", str(tmp_path / "nowhere"), "--output-dir", str(tmp_path / "run"), "--no-dvclive"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "tokenizer.json is missing" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_damaged_train_state_is_named(data_dir, tmp_path):
    checkpoint = committed_checkpoint(data_dir, tmp_path)
    (checkpoint / "train_state.json").write_text('{"step": 2, "model_con')
    with pytest.raises(ValueError, match=f"{checkpoint / 'train_state.json'}: cannot read it"):
        preflight(config(data_dir, tmp_path, resume=True), 1)


def test_training_checkpoint_without_optimizer_state_is_not_resumed(data_dir, tmp_path):
    """Only a converted checkpoint (``source`` in its train state) may start the optimizer afresh."""
    from linear_moe.components.train.checkpoint import load_checkpoint

    checkpoint = committed_checkpoint(data_dir, tmp_path)
    with pytest.raises(ValueError, match="has no optimizer/ state, so resuming it would restart the optimizer"):
        load_checkpoint(checkpoint, [], optimizer=object())


def test_resumed_metrics_drop_the_records_after_the_checkpoint(tmp_path):
    """metrics.jsonl and dvclive's per-metric tables hold each step once, at its own step number."""
    from linear_moe.components.train.metrics import MetricsLogger

    def table(name):
        rows = (tmp_path / "dvclive" / "plots" / "metrics" / f"{name}.tsv").read_text().splitlines()[1:]
        return [(int(step), float(value)) for step, value in (row.split("\t") for row in rows)]

    fresh = MetricsLogger(tmp_path, use_dvclive=True, resume_step=None)
    for step in (1, 2, 3, 4):
        fresh.log(step, {"loss": float(step)})
    fresh.close()
    assert table("train/loss") == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0)]
    resumed = MetricsLogger(tmp_path, use_dvclive=True, resume_step=2)  # killed after logging 4, resumed at 2
    resumed.log(3, {"loss": 30.0})
    resumed.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "metrics.jsonl")] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    assert table("train/loss") == [(1, 1.0), (2, 2.0), (3, 30.0)]
    MetricsLogger(tmp_path, use_dvclive=False, resume_step=None).close()  # a fresh run starts a new file
    assert read_metrics(tmp_path / "metrics.jsonl") == []
