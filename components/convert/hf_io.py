"""The Hugging Face side of the converter: read and write a ``LinearMoEForCausalLM`` directory.

Weights are safetensors only (no pickle). A written directory holds ``config.json``,
``generation_config.json``, ``model.safetensors`` (or shards + ``model.safetensors.index.json``) and
the tokenizer files, and loads with ``AutoModelForCausalLM.from_pretrained`` once
``linear_moe.model.modeling`` is imported.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from linear_moe.components.convert.adapter import check_names_and_shapes
from linear_moe.model.config import ModelConfig

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
#: tokenizer files copied when present; ``tokenizer.json`` is required.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "chat_template.jinja")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SHARD_SIZE = re.compile(r"^\s*\d+(\.\d+)?\s*(TB|GB|MB|KB)\s*$", re.IGNORECASE)  # what save_pretrained parses


def check_write_options(shard_size: str | int, dtype: str) -> None:
    """Raise naming the option when ``shard_size`` or ``dtype`` would be refused (before the slow part)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: use one of {sorted(DTYPES)}")
    if isinstance(shard_size, str):
        valid = bool(_SHARD_SIZE.match(shard_size)) and float(shard_size.strip()[:-2]) > 0
    else:
        valid = isinstance(shard_size, int) and not isinstance(shard_size, bool) and shard_size > 0
    if not valid:
        raise ValueError(f"shard_size={shard_size!r}: use a positive number of bytes or a size with a unit "
                         "KB, MB, GB or TB, e.g. 500MB or 2GB")


#: keys of a config.json that are Hugging Face's own, not ModelConfig fields (saved by save_pretrained)
HF_CONFIG_KEYS = frozenset({
    "_name_or_path", "architectures", "auto_map", "model_type", "transformers_version", "dtype", "torch_dtype",
    "head_dim", "tie_word_embeddings", "use_cache", "bos_token_id", "eos_token_id", "pad_token_id",
    "sep_token_id", "decoder_start_token_id", "return_dict", "output_attentions", "output_hidden_states",
    "is_encoder_decoder", "problem_type", "id2label", "label2id", "chunk_size_feed_forward",
})


def tied_keys(model_config: ModelConfig) -> set[str]:
    """HF keys that are views of other tensors (absent from megatron's state dict at PP = 1)."""
    return {"lm_head.weight"} if model_config.tie_word_embeddings else set()


def _meta_model(model_config: ModelConfig):
    from linear_moe.model.modeling import LinearMoEConfig, LinearMoEForCausalLM

    with torch.device("meta"):
        return LinearMoEForCausalLM(LinearMoEConfig.from_model_config(model_config))


def expected_shapes(model_config: ModelConfig) -> dict[str, torch.Size]:
    """Name -> shape of every tensor the HF model owns (tied views left out)."""
    skip = tied_keys(model_config)
    return {k: v.shape for k, v in _meta_model(model_config).state_dict().items() if k not in skip}


# ---------------------------------------------------------------------- reading
def read_hf_dir(hf_dir: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """``(model_config, state_dict)`` of a Hugging Face directory; tied views dropped, names/shapes checked."""
    from safetensors.torch import load_file
    from transformers import PretrainedConfig

    from linear_moe.model.modeling import LinearMoEConfig

    hf_dir = Path(hf_dir)
    config_file = hf_dir / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{hf_dir}: config.json is missing; expected a Hugging Face model directory")
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{config_file}: not valid JSON ({err}); restore the file written by the convert step "
                         "or save_pretrained()") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{config_file}: expected a JSON object of model settings, got {type(raw).__name__}")
    hf_keys = HF_CONFIG_KEYS | set(PretrainedConfig().to_dict())  # this transformers version's generic keys
    unknown = sorted(set(raw) - set(ModelConfig.__dataclass_fields__) - hf_keys)
    if unknown:
        raise ValueError(f"{config_file}: unknown key(s) {unknown}; a Linear-MoE config.json holds ModelConfig "
                         f"fields {sorted(ModelConfig.__dataclass_fields__)}: fix or remove them")
    try:
        model_config = LinearMoEConfig.from_pretrained(str(hf_dir)).to_model_config()
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise ValueError(f"{config_file}: not a valid Linear-MoE model config ({type(err).__name__}: {err}); "
                         "fix the named field") from None
    files, weight_map = _weight_files(hf_dir)
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        try:
            tensors.update(load_file(str(hf_dir / name)))
        except Exception as err:  # safetensors raises its own SafetensorError for a truncated/corrupt file
            raise ValueError(f"{hf_dir / name}: cannot read the weights ({type(err).__name__}: {err}); the file "
                             "is truncated or corrupt: copy the model directory again") from None
    if weight_map is not None:
        absent = sorted(set(weight_map) - set(tensors))
        if absent:
            raise ValueError(f"{hf_dir / INDEX_FILE} lists tensors that its shards do not hold: {absent[:8]}")
    for key in tied_keys(model_config):
        tensors.pop(key, None)
    check_names_and_shapes(expected_shapes(model_config), tensors, f"{hf_dir}")
    return model_config, tensors


def _weight_files(hf_dir: Path) -> tuple[list[str], dict[str, str] | None]:
    if (hf_dir / INDEX_FILE).is_file():
        weight_map = json.loads((hf_dir / INDEX_FILE).read_text()).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{hf_dir / INDEX_FILE} has no 'weight_map'")
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (hf_dir / f).is_file()]
        if missing:
            raise ValueError(f"{hf_dir}: shard file(s) {missing} listed in {INDEX_FILE} are missing; "
                             "copy the complete model directory")
        return files, weight_map
    if (hf_dir / WEIGHTS_FILE).is_file():
        return [WEIGHTS_FILE], None
    pickled = sorted(p.name for p in hf_dir.glob("*.bin"))
    hint = f" (found pickle weights {pickled}; re-save them as safetensors)" if pickled else ""
    raise ValueError(f"{hf_dir}: neither {WEIGHTS_FILE} nor {INDEX_FILE} found{hint}")


# ---------------------------------------------------------------------- writing
def check_tokenizer(tokenizer_dir: str | Path, vocab_size: int):
    """Load the tokenizer in ``tokenizer_dir``; raise if ``tokenizer.json`` is missing or too large."""
    from transformers import PreTrainedTokenizerFast

    tokenizer_dir = Path(tokenizer_dir)
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise ValueError(f"tokenizer_dir {tokenizer_dir}: tokenizer.json is missing; pass the tokenize step's "
                         "output '<dataset>/tokenizer' (or omit tokenizer_dir to export weights only)")
    try:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(tokenizer_dir))
    except Exception as err:  # tokenizers / json raise their own types for a corrupt file
        raise ValueError(f"tokenizer_dir {tokenizer_dir}: cannot load the tokenizer ({type(err).__name__}: {err}); "
                         "pass the tokenize step's intact '<dataset>/tokenizer'") from None
    if len(tokenizer) > vocab_size:
        raise ValueError(f"tokenizer_dir {tokenizer_dir}: the tokenizer has {len(tokenizer)} tokens but the "
                         f"model's vocab_size is {vocab_size}; use the tokenizer the model was trained with")
    return tokenizer


def write_hf_dir(out_dir: Path, model_config: ModelConfig, state_dict: dict[str, torch.Tensor], *,
                 shard_size: str | int = "2GB", dtype: str = "float32", tokenizer_dir: str | Path | None = None) -> None:
    """Write config, safetensors (sharded above ``shard_size``), generation config and tokenizer files."""
    from transformers import GenerationConfig

    check_write_options(shard_size, dtype)
    check_names_and_shapes(expected_shapes(model_config), state_dict, "converted state dict")
    tokenizer = check_tokenizer(tokenizer_dir, model_config.vocab_size) if tokenizer_dir is not None else None
    model = _meta_model(model_config)
    weights = {k: v.to(DTYPES[dtype]) for k, v in state_dict.items()}
    model.load_state_dict(weights, strict=not tied_keys(model_config), assign=True)
    if tied_keys(model_config):
        model.tie_weights()
    model.config.dtype = dtype
    model.save_pretrained(str(out_dir), max_shard_size=shard_size)
    special = {} if tokenizer is None else dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                                pad_token_id=tokenizer.pad_token_id)
    GenerationConfig(**{k: v for k, v in special.items() if v is not None}).save_pretrained(str(out_dir))
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / name).is_file():
                shutil.copy2(Path(tokenizer_dir) / name, out_dir / name)
