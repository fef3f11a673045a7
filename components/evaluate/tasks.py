"""The built-in task suite: lm-eval task YAMLs over local JSON files, generated from held-out text.

Three tasks, each one example per usable test document, deterministic given the documents and
the seed (the JSON files are byte-identical across runs):

    heldout_perplexity  loglikelihood_rolling over the whole document: word_perplexity,
                        byte_perplexity, bits_per_byte
    heldout_cloze       LAMBADA-style: context = passage minus its last word, target = " " + that
                        word; acc (the target is the greedy continuation) and perplexity
    heldout_choice      HellaSwag-style: context = a passage's first sentences, 4 endings = its true
                        next sentence + 3 next sentences of OTHER passages (seeded); acc, acc_norm

The YAMLs point at the JSON files with ``dataset_path: json`` and absolute ``data_files``, so
lm-eval loads them offline through ``TaskManager(include_path=tasks_dir)``.
"""
from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from linear_moe.components.evaluate.inputs import read_json_lines
from linear_moe.components.files import atomic_write_text

PERPLEXITY_TASK = "heldout_perplexity"
CLOZE_TASK = "heldout_cloze"
CHOICE_TASK = "heldout_choice"
BUILTIN = "builtin"  # the name that stands for all three in evaluate(tasks=...)

NUM_CHOICES = 4  # gold + 3 distractors
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_CLOZE_WORD = re.compile(r"[A-Za-z](?:[A-Za-z']*[A-Za-z])?")  # a word without punctuation


@dataclass(frozen=True)
class SuiteOptions:
    cloze_passage_words: int = 64  # a cloze passage is at most the first this-many words of a document
    min_context_words: int = 8  # cloze and choice contexts have at least this many words
    choice_context_words: int = 24  # choice context: first sentences until they reach this many words
    min_ending_words: int = 6  # choice endings: whole sentences until they reach this many words
    max_ending_words: int = 32  # choice endings longer than this are cut to this many words


# ---------------------------------------------------------------------- examples
def perplexity_examples(docs: Sequence[str]) -> list[dict]:
    """One ``{"text"}`` per non-empty document, stripped (so lm-eval's word count is the
    number of whitespace-separated words)."""
    return [{"text": doc.strip()} for doc in docs if doc.strip()]


def cloze_example(doc: str, options: SuiteOptions) -> dict | None:
    """``{"context", "target"}`` from the first ``cloze_passage_words`` words of ``doc``: the
    target is the last word that is a plain word once trailing punctuation is dropped; ``None``
    when the passage has no such word after ``min_context_words`` words."""
    words = doc.split()[: options.cloze_passage_words]
    for j in range(len(words) - 1, options.min_context_words - 1, -1):
        core = words[j].rstrip(".,;:!?\"')]-")
        if _CLOZE_WORD.fullmatch(core) and len(core) >= 2:
            return {"context": " ".join(words[:j]), "target": " " + core}
    return None


def split_context_ending(doc: str, options: SuiteOptions) -> tuple[str, str] | None:
    """``(context, ending)``: the first sentences of ``doc`` (at least ``choice_context_words``
    words, or all but the last sentence) and the sentences right after them (at least
    ``min_ending_words`` words, cut to ``max_ending_words``); ``None`` if ``doc`` is too short."""
    sentences = [s.split() for s in _SENTENCE_END.split(" ".join(doc.split())) if s]
    context_words, k = 0, 0
    while k < len(sentences) - 1 and context_words < options.choice_context_words:
        context_words += len(sentences[k])
        k += 1
    ending: list[str] = []
    for end in range(k + 1, len(sentences) + 1):  # whole sentences until the ending is long enough
        ending = [w for sentence in sentences[k:end] for w in sentence]
        if len(ending) >= options.min_ending_words:
            break
    if context_words < options.min_context_words or len(ending) < options.min_ending_words:
        return None
    return " ".join(w for sentence in sentences[:k] for w in sentence), " ".join(ending[: options.max_ending_words])


def choice_examples(docs: Sequence[str], seed: int, options: SuiteOptions) -> list[dict]:
    """``{"context", "endings", "label"}`` per usable document; the 3 distractors are endings of
    other documents, distinct from the gold and from each other; the gold's slot is seeded."""
    pairs = [p for p in (split_context_ending(doc, options) for doc in docs) if p is not None]
    rng = random.Random(seed)
    examples = []
    for i, (context, gold) in enumerate(pairs):
        pool = sorted({ending for j, (_, ending) in enumerate(pairs) if j != i and ending != gold})
        if len(pool) < NUM_CHOICES - 1:
            continue
        endings = rng.sample(pool, NUM_CHOICES - 1)
        label = rng.randrange(NUM_CHOICES)
        endings.insert(label, gold)
        examples.append({"context": context, "endings": endings, "label": label})
    return examples


# ---------------------------------------------------------------------- task configs
def _base_config(name: str, data_file: Path, output_type: str) -> dict:
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file.resolve())}},
        "test_split": "test",
        "output_type": output_type,
        "metadata": {"version": 1.0},
    }


def perplexity_config(name: str, data_file: Path) -> dict:
    return {**_base_config(name, data_file, "loglikelihood_rolling"),
            "doc_to_text": "", "doc_to_target": "text",
            "metric_list": [{"metric": m} for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")]}


def cloze_config(name: str, data_file: Path) -> dict:
    return {**_base_config(name, data_file, "loglikelihood"),
            "doc_to_text": "context", "doc_to_target": "target", "target_delimiter": "",
            "metric_list": [{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                            {"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}


def choice_config(name: str, data_file: Path) -> dict:
    return {**_base_config(name, data_file, "multiple_choice"),
            "doc_to_text": "context", "doc_to_choice": "endings", "doc_to_target": "label",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]}


@dataclass(frozen=True)
class TaskSpec:
    make_examples: Callable[[Sequence[str], int, SuiteOptions], list[dict]]  # (docs, seed, options)
    make_config: Callable[[str, Path], dict]  # (task name, data file) -> lm-eval task config
    needs: str  # what a document must have to yield an example (for error messages)


TASKS: dict[str, TaskSpec] = {
    PERPLEXITY_TASK: TaskSpec(lambda docs, seed, opt: perplexity_examples(docs), perplexity_config,
                              "non-empty text"),
    CLOZE_TASK: TaskSpec(lambda docs, seed, opt: [e for e in (cloze_example(d, opt) for d in docs) if e],
                         cloze_config, f"a plain last word after {SuiteOptions.min_context_words}+ words"),
    CHOICE_TASK: TaskSpec(choice_examples, choice_config,
                          f"2+ sentences; the task needs {NUM_CHOICES}+ such documents"),
}


def write_suite(docs: Sequence[str], tasks_dir: str | Path, *, seed: int = 1234,
                options: SuiteOptions = SuiteOptions(), source: str = "test data") -> list[str]:
    """Write ``<task>.jsonl`` + ``<task>.yaml`` for every built-in task into ``tasks_dir``;
    returns the task names. Raises ``ValueError`` naming ``source`` if a task gets no example."""
    import yaml

    tasks_dir = Path(tasks_dir)
    tasks_dir.mkdir(parents=True, exist_ok=True)
    for name, spec in TASKS.items():
        examples = spec.make_examples(docs, seed, options)
        if not examples:
            raise ValueError(f"{source}: no document yields an example for task {name!r} "
                             f"({len(docs)} document(s); it needs {spec.needs}); give more or longer documents")
        data_file = tasks_dir / f"{name}.jsonl"
        atomic_write_text(data_file, "".join(json.dumps(e, ensure_ascii=False, sort_keys=True) + "\n"
                                             for e in examples))
        atomic_write_text(tasks_dir / f"{name}.yaml",
                          yaml.safe_dump(spec.make_config(name, data_file), sort_keys=False))
    return list(TASKS)


def read_documents(path: str | Path, text_field: str = "text") -> list[str]:
    """The non-empty ``text_field`` strings of a JSON-lines file, in file order."""
    path = Path(path)
    docs = []
    for line_no, record in read_json_lines(path, "test data"):
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise ValueError(f"test data {path}, line {line_no}: expected an object with a string "
                             f"{text_field!r} field (set text_field to the field holding the text)")
        if record[text_field].strip():
            docs.append(record[text_field])
    if not docs:
        raise ValueError(f"test data {path}: no non-empty {text_field!r} document; pass held-out text (the "
                         "tokenize step writes it with test_fraction > 0) or set text_field to the field holding it")
    return docs
