"""Byte-level BPE: train with HF ``tokenizers``, load an existing one, save in Hugging Face format.

The saved directory holds ``tokenizer.json``, ``tokenizer_config.json`` and
``special_tokens_map.json`` and loads offline with ``transformers.AutoTokenizer`` or
``PreTrainedTokenizerFast``. No normaliser: decoding the ids of a text gives the text back exactly.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

BYTE_ALPHABET = 256  # a byte-level BPE starts from one token per byte


def check_vocab_size(vocab_size: int, special_tokens: list[str]) -> None:
    """Raise when ``vocab_size`` cannot hold the byte alphabet plus ``special_tokens``."""
    minimum = BYTE_ALPHABET + len(special_tokens)
    if vocab_size < minimum:
        raise ValueError(
            f"vocab_size={vocab_size} is smaller than the byte alphabet ({BYTE_ALPHABET}) plus "
            f"{len(special_tokens)} special token(s) {special_tokens}: use vocab_size >= {minimum}"
        )


def train_bpe(texts: Iterable[str], vocab_size: int, special_tokens: list[str], length: int | None = None):
    """Train a byte-level BPE from an iterator of texts (streamed, never held in memory at once).

    Special tokens get the first ids (the end-of-document token is id 0 with the default specials).
    The result may have fewer than ``vocab_size`` tokens when the corpus runs out of merges.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    check_vocab_size(vocab_size, special_tokens)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=length)
    return tokenizer


def wrap_hf(tokenizer, eod_token: str):
    """A ``PreTrainedTokenizerFast`` around a ``tokenizers.Tokenizer`` with ``eod_token`` as eos/bos."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=eod_token,
        bos_token=eod_token,
        clean_up_tokenization_spaces=False,  # decode must return the text unchanged
    )


def load_hf(path: str | Path, eod_token: str):
    """Load ``path``: a ``tokenizer.json`` file or a local Hugging Face tokenizer directory (offline)."""
    path = Path(path)
    if path.is_file():
        from tokenizers import Tokenizer

        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as err:
            raise ValueError(f"tokenizer {path}: not a tokenizers JSON file ({err})") from None
        return wrap_hf(tokenizer, eod_token)
    if path.is_dir():
        from transformers import AutoTokenizer

        try:
            hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except Exception as err:
            raise ValueError(f"tokenizer {path}: not a loadable Hugging Face tokenizer directory ({err})") from None
        if getattr(hf, "backend_tokenizer", None) is None:
            raise ValueError(f"tokenizer {path}: has no fast (tokenizers) backend; save it with tokenizer.json")
        return hf
    raise ValueError(f"tokenizer {path}: no such file or directory (expected tokenizer.json or a HF directory)")


def eod_id(hf, eod_token: str) -> int:
    """Id of ``eod_token`` in ``hf``'s vocabulary; raises naming the tokens that exist."""
    token_id = hf.backend_tokenizer.token_to_id(eod_token)
    if token_id is None:
        specials = sorted(str(t) for t in hf.all_special_tokens)
        raise ValueError(
            f"eod_token {eod_token!r} is not in the tokenizer's vocabulary; pass --eod-token with one of "
            f"its special tokens {specials}"
        )
    return token_id


def save_hf(hf, out_dir: Path, eod_token: str) -> None:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` to ``out_dir``."""
    hf.save_pretrained(str(out_dir))
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    if config.get("tokenizer_class") == "TokenizersBackend":  # transformers 5 name; 4.x knows the alias
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    specials = {name: str(getattr(hf, name)) for name in ("bos_token", "eos_token", "unk_token", "pad_token")
                if getattr(hf, name, None) is not None}
    specials.setdefault("eos_token", eod_token)
    (out_dir / "special_tokens_map.json").write_text(json.dumps(specials, indent=2, sort_keys=True) + "\n")
