"""Batch encoding in worker processes, results in input order, a bounded number of batches in flight.

Workers are spawned (not forked: the parent may hold tokenizers' thread pool and tqdm's monitor
thread) and import only ``tokenizers`` and ``numpy``. Each loads the saved ``tokenizer.json`` once.
"""
from __future__ import annotations

import collections
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np


@dataclass
class EncodedBatch:
    """Token ids of a batch of documents, each followed by the end-of-document id."""

    ids_T: np.ndarray  # [sum(lengths_N)] token ids, documents concatenated, dtype of the .bin file
    lengths_N: np.ndarray  # [N] int64 tokens per document, end-of-document token included
    bytes_N: np.ndarray  # [N] int64 UTF-8 bytes per document


class BatchEncoder:
    """Encodes lists of texts with a ``tokenizers.Tokenizer``; special-token strings in the text
    are encoded as plain text, so only the appended end-of-document id is special."""

    def __init__(self, tokenizer_json: str, eod_id: int, dtype: str) -> None:
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(tokenizer_json)
        self.tokenizer.encode_special_tokens = True
        self.eod_id = eod_id
        self.dtype = np.dtype(dtype)
        encode = getattr(self.tokenizer, "encode_batch_fast", None)  # no offsets: faster (>= 0.20)
        self._encode = encode or self.tokenizer.encode_batch

    def __call__(self, texts: list[str]) -> EncodedBatch:
        encodings = self._encode(texts, add_special_tokens=False)
        lengths_N = np.fromiter((len(e.ids) + 1 for e in encodings), dtype=np.int64, count=len(encodings))
        ids_T = np.empty(int(lengths_N.sum()), dtype=self.dtype)
        ends_N = np.cumsum(lengths_N)
        for encoding, end, length in zip(encodings, ends_N.tolist(), lengths_N.tolist()):
            ids_T[end - length:end - 1] = encoding.ids
        ids_T[ends_N - 1] = self.eod_id
        bytes_N = np.fromiter((len(t.encode("utf-8")) for t in texts), dtype=np.int64, count=len(texts))
        return EncodedBatch(ids_T, lengths_N, bytes_N)


_ENCODER: list[BatchEncoder] = []  # the per-process encoder, set by init_encoder


def init_encoder(tokenizer_json: str, eod_id: int, dtype: str) -> None:
    """Process initialiser: build this process's :class:`BatchEncoder`."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # parallelism comes from the processes
    _ENCODER[:] = [BatchEncoder(tokenizer_json, eod_id, dtype)]


def encode_batch(texts: list[str]) -> EncodedBatch:
    return _ENCODER[0](texts)


def batched(texts: Iterable[str], batch_chars: int) -> Iterator[list[str]]:
    """Group texts into lists of about ``batch_chars`` characters (at least one text each)."""
    batch: list[str] = []
    size = 0
    for text in texts:
        batch.append(text)
        size += len(text)
        if size >= batch_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def ordered_map(
    fn: Callable, items: Iterable, workers: int, initializer: Callable, initargs: tuple
) -> Iterator[tuple[object, object]]:
    """Yield ``(item, fn(item))`` in input order; at most ``2 * workers`` items are in flight, so
    memory stays bounded however long ``items`` is. ``workers <= 1`` runs in this process."""
    if workers <= 1:
        initializer(*initargs)
        for item in items:
            yield item, fn(item)
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=initializer, initargs=initargs) as pool:
        pending: collections.deque = collections.deque()
        for item in items:
            pending.append((item, pool.submit(fn, item)))
            if len(pending) >= 2 * workers:
                done_item, future = pending.popleft()
                yield done_item, future.result()
        while pending:
            done_item, future = pending.popleft()
            yield done_item, future.result()
