"""The convert step: megatron dist checkpoints <-> Hugging Face directories.

References: the megatron model that wrote the checkpoint (TP=2, EP=2, gloo, two processes) for the
exported logits; the original Hugging Face tensors for the round trip (``torch.equal``). One module
fixture runs the two-process part once (spawning costs seconds on a 2-core box).
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from torch.multiprocessing.spawn import ProcessException
from safetensors.torch import load_file, save_file

from dist_support import spawn_world
from linear_moe.components.convert import convert, hf_to_megatron
from linear_moe.components.convert.cli import build_parser
from linear_moe.kernels.testing import assert_rel_close
from linear_moe.model.config import preset
from linear_moe.model.modeling import LinearMoEConfig, LinearMoEForCausalLM

# sigmoid-bias router (expert_bias), shared experts with their gate, routed experts, GLA mixer
MODEL = dict(num_shared_experts=1, shared_expert_gate=True, moe_router="sigmoid_bias")
TP, EP = 2, 2
B, T = 2, 16


def _hf_tensors(path: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def _perturbed_hf_model(model_config) -> LinearMoEForCausalLM:
    """Init, then noise on every tensor: norms and the expert bias stop being ones/zeros."""
    model = LinearMoEForCausalLM(LinearMoEConfig.from_model_config(model_config)).eval()
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.add_(0.02 * torch.randn_like(tensor))
    return model


def _tokenizer_dir(path: Path, vocab_size: int) -> Path:
    """A word-level tokenizer.json (no download), with <eos>."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<eos>": 0, "<unk>": 1, **{f"w{i}": i + 2 for i in range(vocab_size - 2)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    path.mkdir(parents=True)
    tokenizer.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>", "unk_token": "<unk>",
                                                            "tokenizer_class": "PreTrainedTokenizerFast"}))
    return path


def _gathered_logits(model, tokens_BT: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary logits ``(B, T, V)`` of the megatron model (the output layer is vocab-parallel)."""
    from megatron.core import tensor_parallel

    model.eval()
    position_ids_BT = torch.arange(tokens_BT.shape[1]).expand_as(tokens_BT)
    with torch.no_grad():
        logits = model(tokens_BT, position_ids_BT, None)
        return tensor_parallel.gather_from_tensor_model_parallel_region(logits).clone()


def _worker(rank: int, scratch_dir: str, root: str) -> dict:
    """TP=2/EP=2: load the HF-derived checkpoint, take one training step, save, record logits."""
    from linear_moe.components.train.checkpoint import load_checkpoint, save_checkpoint
    from linear_moe.model.config import ModelConfig
    from linear_moe.model.megatron.config import transformer_config
    from linear_moe.model.megatron.gpt import build_gpt_model
    from linear_moe.model.megatron.parallel import ParallelSizes, initialize_parallel
    from linear_moe.components.train.config import TrainConfig
    from linear_moe.components.train.optim import TorchAdamW
    from linear_moe.components.train.step import TrainingModel
    from linear_moe.model.megatron.step import wrap_ddp

    root = Path(root)
    sizes = ParallelSizes(tensor=TP, expert=EP, expert_tensor=1)
    initialize_parallel(sizes)
    model_config = ModelConfig.from_dict(json.loads((root / "from_hf" / "train_state.json").read_text())["model_config"])
    config = transformer_config(model_config, sizes, params_dtype=torch.float32)
    model = build_gpt_model(model_config, config)
    load_checkpoint(root / "from_hf", [model], None)
    tokens_BT = load_file(str(root / "tokens.safetensors"))["tokens"]
    loaded_logits = _gathered_logits(model, tokens_BT)
    ddp = wrap_ddp(model, config)
    optimizer = TorchAdamW([ddp], TrainConfig(lr=1e-2, min_lr=0.0))
    ddp.train()
    trainer = TrainingModel(model_config, config, [ddp], seq_length=T, micro_batch_size=B)
    trainer.train_step([{"tokens": tokens_BT, "labels": tokens_BT.roll(-1, 1)}], optimizer)
    save_checkpoint(root / "run" / "checkpoints", 1, [ddp], optimizer, {"model_config": model_config.to_dict()})
    return {"loaded": loaded_logits, "trained": _gathered_logits(model, tokens_BT)}


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    """A perturbed HF model (sharded, with an index) and its hf_to_megatron checkpoint."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("convert")
    model_config = preset("tiny", **MODEL)
    hf_model = _perturbed_hf_model(model_config)
    hf_model.save_pretrained(str(root / "hf"), max_shard_size="100KB")
    hf_to_megatron(root / "hf", root / "from_hf")
    return dict(root=root, hf_model=hf_model, model_config=model_config)


@pytest.fixture(scope="module")
def tp2_ep2_run(hf_checkpoint):
    """Two TP=2/EP=2 ranks load the hf_to_megatron checkpoint, step once and save; a failure is kept
    and re-raised by the tests that need the run."""
    root = hf_checkpoint["root"]
    tokens_BT = torch.randint(0, hf_checkpoint["model_config"].vocab_size, (B, T))
    save_file({"tokens": tokens_BT}, str(root / "tokens.safetensors"))
    try:
        logits = spawn_world(_worker, args=(str(root),), nprocs=TP)
    except ProcessException as error:  # a rank raised or exited
        return dict(hf_checkpoint, error=error)
    with torch.no_grad():
        hf_logits = hf_checkpoint["hf_model"](tokens_BT).logits
    return dict(hf_checkpoint, error=None, tokens=tokens_BT, hf_logits=hf_logits, logits=logits)


def _completed(run: dict) -> dict:
    if run["error"] is not None:
        raise run["error"]
    return run


@pytest.mark.distributed
@pytest.mark.xdist_group("dist")
def test_hf_to_megatron_loads_in_tp2_ep2_with_hf_logits(tp2_ep2_run):
    tp2_ep2_run = _completed(tp2_ep2_run)
    assert_rel_close("tp2/ep2 logits of the hf_to_megatron checkpoint", tp2_ep2_run["hf_logits"],
                     tp2_ep2_run["logits"]["loaded"], 1e-4)


@pytest.mark.distributed
@pytest.mark.xdist_group("dist")
def test_tp2_ep2_export_matches_megatron_logits(tp2_ep2_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tp2_ep2_run = _completed(tp2_ep2_run)
    root = tp2_ep2_run["root"]
    tokenizer_dir = _tokenizer_dir(root / "tokenizer", tp2_ep2_run["model_config"].vocab_size)
    out = convert(root / "run", root / "exported", tokenizer_dir)  # train output dir -> latest checkpoint
    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert isinstance(model, LinearMoEForCausalLM)
    with torch.no_grad():
        logits = model(tp2_ep2_run["tokens"]).logits
    assert_rel_close("exported logits vs tp2/ep2 megatron", tp2_ep2_run["logits"]["trained"], logits, 1e-4)
    assert AutoTokenizer.from_pretrained(str(out)).eos_token_id == 0
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 0


@pytest.mark.xdist_group("dist")
def test_hf_megatron_hf_roundtrip_is_bit_identical(hf_checkpoint):
    root = hf_checkpoint["root"]
    out = convert(root / "from_hf", root / "roundtrip", shard_size="100KB")
    assert (out / "model.safetensors.index.json").is_file()
    original, converted = _hf_tensors(root / "hf"), _hf_tensors(out)
    assert sorted(original) == sorted(converted)
    for name, tensor in original.items():
        assert converted[name].dtype == tensor.dtype and torch.equal(converted[name], tensor), name


@pytest.mark.xdist_group("dist")
def test_checkpoint_with_wrong_model_config_names_the_tensor(hf_checkpoint, tmp_path):
    step = tmp_path / "step"
    shutil.copytree(hf_checkpoint["root"] / "from_hf", step)
    state = json.loads((step / "train_state.json").read_text())
    state["model_config"]["moe_ffn_hidden_size"] = 32
    (step / "train_state.json").write_text(json.dumps(state))
    with pytest.raises(ValueError, match=r"linear_fc2\.weight.*has shape"):
        convert(step, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.xdist_group("dist")
def test_hybrid_pattern_roundtrip_is_bit_identical(tmp_path):
    """Attention + LSM and MoE + dense layers: each key exists in only some layers."""
    model_config = preset("tiny-hybrid", layer_pattern="LlAa", **MODEL)
    _perturbed_hf_model(model_config).save_pretrained(str(tmp_path / "hf"))
    hf_to_megatron(tmp_path / "hf", tmp_path / "ckpt")
    out = convert(tmp_path / "ckpt", tmp_path / "roundtrip")
    original, converted = _hf_tensors(tmp_path / "hf"), _hf_tensors(out)
    assert sorted(original) == sorted(converted)
    for name, tensor in original.items():
        assert torch.equal(converted[name], tensor), name


# ---------------------------------------------------------------------- bad input (no megatron needed)
@pytest.fixture
def small_hf_dir(tmp_path) -> Path:
    model_config = preset("tiny", num_experts=2, moe_top_k=1, vocab_size=64)
    LinearMoEForCausalLM(LinearMoEConfig.from_model_config(model_config)).save_pretrained(
        str(tmp_path / "hf"), max_shard_size="50KB")
    return tmp_path / "hf"


def test_missing_shard_is_named(small_hf_dir, tmp_path):
    weight_map = json.loads((small_hf_dir / "model.safetensors.index.json").read_text())["weight_map"]
    victim = sorted(set(weight_map.values()))[1]
    os.remove(small_hf_dir / victim)
    with pytest.raises(ValueError, match=f"{victim}.*missing"):
        hf_to_megatron(small_hf_dir, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_config_that_does_not_match_weights_names_the_tensor(small_hf_dir, tmp_path):
    config = json.loads((small_hf_dir / "config.json").read_text())
    config["moe_ffn_hidden_size"] = 32
    (small_hf_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.ffn\.experts\.gate_EDF.*has shape"):
        hf_to_megatron(small_hf_dir, tmp_path / "ckpt")


def test_pickle_only_weights_are_refused(small_hf_dir, tmp_path):
    for file in small_hf_dir.glob("model*.safetensors*"):
        file.unlink()
    (small_hf_dir / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="pytorch_model.bin.*safetensors"):
        hf_to_megatron(small_hf_dir, tmp_path / "ckpt")


def test_missing_tokenizer_json_is_reported_before_loading(tmp_path):
    step = tmp_path / "ckpt" / "step_0000001"
    (step / "model").mkdir(parents=True)
    (step / "model" / "metadata.json").write_text("{}")
    (step / "train_state.json").write_text(json.dumps({"model_config": preset("tiny").to_dict(), "step": 1}))
    (tmp_path / "tok").mkdir()
    with pytest.raises(ValueError, match="tokenizer.json is missing"):
        convert(tmp_path / "ckpt", tmp_path / "out", tmp_path / "tok")


def test_incomplete_checkpoint_is_not_taken(tmp_path):
    (tmp_path / "run" / "checkpoints" / "step_0000005.partial" / "model").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "step_0000004" / "model").mkdir(parents=True)  # no train_state.json
    with pytest.raises(ValueError, match="no complete checkpoint"):
        convert(tmp_path / "run", tmp_path / "out")


def _fake_step(root: Path, state_text: str) -> Path:
    """A step directory that passes resolve_checkpoint, with ``state_text`` as its train_state.json."""
    step = root / "checkpoints" / "step_0000001"
    (step / "model").mkdir(parents=True)
    (step / "model" / "metadata.json").write_text("{}")
    (step / "train_state.json").write_text(state_text)
    return step


def test_damaged_checkpoint_inputs_are_errors_naming_the_file(tmp_path):
    """A truncated train_state.json, a corrupt tokenizer.json, a bad shard_size or dtype: a ValueError
    naming the file or option, raised before any output is written."""
    step = _fake_step(tmp_path / "run", '{"step": ')
    with pytest.raises(ValueError, match=re.escape(f"{step / 'train_state.json'}: cannot read")):
        convert(tmp_path / "run", tmp_path / "out")
    (step / "train_state.json").write_text(json.dumps({"model_config": preset("tiny").to_dict(), "step": 1}))
    _tokenizer_dir(tmp_path / "tok", 16)
    (tmp_path / "tok" / "tokenizer.json").write_text('{"version": ')
    with pytest.raises(ValueError, match=re.escape(f"tokenizer_dir {tmp_path / 'tok'}: cannot load the tokenizer")):
        convert(tmp_path / "run", tmp_path / "out", tmp_path / "tok")
    with pytest.raises(ValueError, match=r"shard_size='2XB': use a positive number of bytes"):
        convert(tmp_path / "nowhere", tmp_path / "out", shard_size="2XB")  # checked before the checkpoint
    with pytest.raises(ValueError, match=r"dtype='fp8'"):
        convert(tmp_path / "nowhere", tmp_path / "out", dtype="fp8")
    assert not (tmp_path / "out").exists()


def test_damaged_hf_dir_is_an_error_naming_the_file(small_hf_dir, tmp_path):
    """config.json that is not JSON, has an unknown key or a wrongly typed field, and a truncated
    safetensors shard: each a ValueError naming the file, never a traceback from transformers."""
    config_file = small_hf_dir / "config.json"
    good = json.loads(config_file.read_text())
    config_file.write_text('{"model_type": ')
    with pytest.raises(ValueError, match=re.escape(f"{config_file}: not valid JSON")):
        hf_to_megatron(small_hf_dir, tmp_path / "ckpt")
    config_file.write_text(json.dumps({**good, "hiden_size": 32}))
    with pytest.raises(ValueError, match=re.escape(f"{config_file}: unknown key(s) ['hiden_size']")):
        hf_to_megatron(small_hf_dir, tmp_path / "ckpt")
    config_file.write_text(json.dumps({**good, "num_heads": "four"}))
    with pytest.raises(ValueError, match=re.escape(f"{config_file}: not a valid Linear-MoE model config")):
        hf_to_megatron(small_hf_dir, tmp_path / "ckpt")
    config_file.write_text(json.dumps(good))
    shard = sorted(small_hf_dir.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ValueError, match=re.escape(f"{shard}: cannot read the weights")):
        hf_to_megatron(small_hf_dir, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_output_that_is_not_a_previous_output_is_never_replaced(small_hf_dir, tmp_path):
    """Writing over the input, a file, or someone's non-empty directory is refused with their
    contents intact (the atomic swap would delete them)."""
    before = {p.name: p.read_bytes() for p in small_hf_dir.iterdir()}
    with pytest.raises(ValueError, match="without train_state.json, so not a previous output"):
        hf_to_megatron(small_hf_dir, small_hf_dir)
    assert {p.name: p.read_bytes() for p in small_hf_dir.iterdir()} == before
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match=r"notes\.txt exists and is not a directory"):
        convert(tmp_path / "nowhere", tmp_path / "notes.txt")
    with pytest.raises(ValueError, match="without config.json, so not a previous output"):
        convert(tmp_path / "nowhere", tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_corrupt_dist_checkpoint_is_an_error_naming_it(small_hf_dir, tmp_path):
    """A truncated shard of a real dist checkpoint (written by hf_to_megatron, world of one): a
    ValueError naming the checkpoint directory, not torch's CheckpointException/EOFError."""
    step = hf_to_megatron(small_hf_dir, tmp_path / "ckpt")
    shard = sorted((step / "model").glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ValueError, match=re.escape(f"checkpoint {step / 'model'}: cannot read it")):
        convert(step, tmp_path / "exported")
    assert not (tmp_path / "exported").exists()


def test_cli_help_explains_every_option():
    parser = build_parser()
    for action in parser._actions:
        assert action.help, f"option {action.option_strings} has no help text"
    assert {"--direction", "--input", "--output", "--tokenizer-dir", "--shard-size", "--dtype"} <= {
        s for a in parser._actions for s in a.option_strings}


def test_kfp_component_declares_pipeline_artifacts():
    from linear_moe.components.convert.kfp_component import convert_component

    spec = convert_component.component_spec
    assert {"checkpoint", "dataset"} <= set(spec.inputs) and set(spec.outputs) == {"hf_model"}
