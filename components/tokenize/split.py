"""Deterministic, seeded document-level split into train / valid / test."""
from __future__ import annotations

import numpy as np

SPLITS = ("train", "valid", "test")  # label i of assign_splits means SPLITS[i]


def check_fractions(valid_fraction: float, test_fraction: float) -> None:
    """Raise naming the argument when a split fraction is out of range (before any corpus pass)."""
    for name, value in (("valid_fraction", valid_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value}")
    if valid_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"valid_fraction + test_fraction = {valid_fraction + test_fraction} must be < 1 to leave training data"
        )


def split_sizes(n_docs: int, valid_fraction: float, test_fraction: float) -> dict[str, int]:
    """Documents per split: valid/test get ``round(n * fraction)``, at least 1 when the fraction is > 0."""
    check_fractions(valid_fraction, test_fraction)
    n_valid = max(1, round(n_docs * valid_fraction)) if valid_fraction > 0 else 0
    n_test = max(1, round(n_docs * test_fraction)) if test_fraction > 0 else 0
    n_train = n_docs - n_valid - n_test
    if n_train < 1:
        raise ValueError(
            f"corpus has {n_docs} documents, too few for valid_fraction={valid_fraction} and "
            f"test_fraction={test_fraction} (every split needs a document): add text or lower doc_chars"
        )
    return {"train": n_train, "valid": n_valid, "test": n_test}


def assign_splits(n_docs: int, valid_fraction: float, test_fraction: float, seed: int) -> np.ndarray:
    """Split label per document, uint8 ``[n_docs]`` (0 train, 1 valid, 2 test), a seeded permutation.

    Memory is one byte per document, so a stream of documents can be labelled by position.
    """
    sizes = split_sizes(n_docs, valid_fraction, test_fraction)
    labels_N = np.repeat(np.arange(len(SPLITS), dtype=np.uint8), [sizes[s] for s in SPLITS])
    return np.random.default_rng(seed).permutation(labels_N)
