"""Training data: megatron ``GPTDataset`` over the tokenize step's indexed datasets.

Sample order is a pure function of (seed, step), so a resumed run sees exactly the batches it
would have seen without the interruption.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class TokenizerInfo:
    """What megatron's GPTDataset needs of a tokenizer."""

    vocab_size: int
    eod: int
    pad: int = -1

    @property
    def unique_identifiers(self) -> dict:
        return {"class": "TokenizerInfo", "vocab_size": self.vocab_size, "eod": self.eod}


def read_tokenizer_info(data_dir: str | Path) -> TokenizerInfo:
    """Vocabulary size and end-of-document id of the tokenizer saved by the tokenize step."""
    tokenizer_dir = Path(data_dir) / "tokenizer"
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise ValueError(f"tokenizer not found: {tokenizer_dir}/tokenizer.json is missing; run the tokenize step "
                         f"into {data_dir} first")
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(tokenizer_dir))
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{tokenizer_dir}: the tokenizer has no eos (end-of-document) token")
    return TokenizerInfo(vocab_size=len(tokenizer), eod=tokenizer.eos_token_id)


def check_dataset(prefix: Path) -> int:
    """Clear errors for a missing or corrupt indexed dataset at ``prefix`` (.bin/.idx); returns its token count."""
    for suffix in (".bin", ".idx"):
        if not prefix.with_suffix(suffix).is_file():
            raise ValueError(f"dataset file {prefix}{suffix} is missing; run the tokenize step first")
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    try:
        dataset = IndexedDataset(str(prefix), mmap=True)
        total = int(dataset.sequence_lengths.sum())
        expected_bytes = total * dataset.index.dtype_size
        actual = prefix.with_suffix(".bin").stat().st_size
    except Exception as error:  # the .idx header or arrays are unreadable
        raise ValueError(f"dataset {prefix}.idx is corrupt: {error}") from error
    if actual != expected_bytes:
        raise ValueError(f"dataset {prefix}.bin is corrupt: {actual} bytes, the index describes {expected_bytes}")
    if len(dataset) == 0:
        raise ValueError(f"dataset {prefix} holds no documents")
    return total


def build_datasets(data_dir: str | Path, *, seq_length: int, seed: int, train_samples: int, valid_samples: int,
                   cache_dir: str | Path, tokenizer: TokenizerInfo):
    """``(train, valid)`` GPTDatasets; ``valid`` is None when there is no validation split."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    from linear_moe.components.tokenize import split_prefix

    train_prefix = Path(split_prefix(data_dir, "train"))
    check_dataset(train_prefix)
    valid_prefix = Path(split_prefix(data_dir, "valid"))
    has_valid = valid_prefix.with_suffix(".idx").is_file() and valid_samples > 0
    if has_valid:
        check_dataset(valid_prefix)
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend_per_split=[([str(train_prefix)], None), ([str(valid_prefix)], None) if has_valid else None, None],
        path_to_cache=str(cache_dir),
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        mmap_bin_files=True,
    )
    sizes = [train_samples, valid_samples if has_valid else 0, 0]
    train, valid, _ = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()
    return train, valid


def random_batches(count: int, *, batch_size: int, seq_length: int, vocab_size: int,
                   generator: torch.Generator, device: torch.device | str = "cpu") -> list[dict[str, torch.Tensor]]:
    """``count`` batches of uniformly random token ids ``(batch_size, seq_length)``, labels the next id
    (the shape the datasets give): synthetic data for benchmarks and tests."""
    ids = torch.randint(0, vocab_size, (count, batch_size, seq_length + 1), generator=generator).to(device)
    return [{"tokens": ids[i, :, :-1].contiguous(), "labels": ids[i, :, 1:].contiguous()} for i in range(count)]


def microbatches(dataset, *, step: int, global_batch_size: int, micro_batch_size: int, dp_rank: int,
                 dp_size: int, eod: int | None = None) -> list[dict[str, torch.Tensor]]:
    """The micro-batches of optimizer step ``step`` that data-parallel rank ``dp_rank`` processes.

    With ``eod`` (``TrainConfig.reset_at_eod``) each also carries ``cu_seqlens``, the offsets of its
    documents (``model.megatron.step.document_offsets``), so the model runs them as separate sequences.
    """
    from linear_moe.model.megatron.step import document_offsets

    per_rank = global_batch_size // dp_size
    start = step * global_batch_size + dp_rank * per_rank
    batches = []
    for offset in range(0, per_rank, micro_batch_size):
        samples = [dataset[(start + offset + i) % len(dataset)] for i in range(micro_batch_size)]
        batch = {key: torch.stack([torch.as_tensor(s[key]) for s in samples])
                 for key in ("tokens", "labels", "loss_mask", "position_ids")}
        if eod is not None:
            batch["cu_seqlens"] = document_offsets(batch["tokens"], eod)
        batches.append(batch)
    return batches
