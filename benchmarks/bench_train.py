"""Training throughput through the trainer's megatron path: tokens/s and peak memory per case.

    python -m benchmarks.bench_train --out benchmarks/results/train_cpu.json               # cpu-tiny
    python -m benchmarks.bench_train --device cuda --suite gpu-lengths --out train_gpu.json

Each case builds :class:`~linear_moe.components.train.step.TrainingModel` (megatron ``GPTModel``
from our layer specs, megatron DDP) in a world of one (``init_process_group`` +
``initialize_parallel``), feeds it synthetic batches of random token ids and times
``train_step`` (forward, backward, clip, the trainer's optimizer). tokens/s = tokens per step / median step time of
``--steps`` timed steps after ``--warmup`` untimed ones (CUDA synchronised around each step). Peak
memory: ``torch.cuda.max_memory_allocated`` since the model was built (CUDA), the process's
``ru_maxrss`` high-water mark (CPU; it never decreases, so later cases inherit earlier peaks).

Suites are a registry (:data:`SUITES`):

* ``cpu-tiny``: the tiny default; shapes from ``params.yaml``'s ``train`` section when it has one,
  else ``TrainConfig``'s defaults (seq 128, micro-batch 4, global batch 8).
* ``gpu-lengths``: an A0.3B-2B-shaped model with fewer layers (``--layers``), bf16, at each of
  ``--lengths`` with the tokens per step held at ``--tokens-per-step``, for pure-LSM patterns
  (``--mixers``) and the all-softmax baseline (``softmax``). An out-of-memory case is recorded,
  not raised. The JSON is written atomically (temp file, then ``os.replace``).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import resource
import statistics
import time
import traceback
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import torch

from linear_moe.components.files import atomic_write_json
from linear_moe.components.train.distributed import world_of_one
from linear_moe.kernels.autotune import current_limit

REPO_ROOT = Path(__file__).resolve().parents[1]

#: Keys every result file has (the smoke test checks them).
TOP_KEYS = ("benchmark", "complete", "suite", "compares", "device", "device_name", "dtype", "versions", "method", "notes",
            "cases", "summary")
#: Keys every case has; ``tokens_per_s``/``median_step_s``/``peak_memory_mb`` are None unless status is "ok".
CASE_KEYS = ("name", "group", "mixer", "layer_pattern", "seq_length", "micro_batch_size", "num_microbatches",
             "tokens_per_step", "status", "step_fn", "step_s", "median_step_s", "tokens_per_s", "peak_memory_mb",
             "losses", "model_config")
STATUSES = ("ok", "oom", "error", "skipped")


# ----------------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    """One timed configuration: a model and a batch shape."""

    name: str  # unique in the suite, e.g. "gla/T4096"
    group: str  # "lsm" or "softmax" (what gpu-lengths compares), "default" (cpu-tiny)
    model_overrides: dict[str, Any]  # ModelConfig fields over ``preset``
    seq_length: int
    micro_batch_size: int
    num_microbatches: int = 1
    preset: str = "tiny"

    @property
    def tokens_per_step(self) -> int:
        return self.seq_length * self.micro_batch_size * self.num_microbatches


@dataclass
class Suite:
    cases: list[Case]
    compares: str  # what is side by side, in words
    dtype: torch.dtype
    notes: list[str] = field(default_factory=list)
    summarise: Callable[[list[dict[str, Any]]], dict[str, Any]] = lambda rows: {}


SUITES: dict[str, Callable[[argparse.Namespace], Suite]] = {}


def register_suite(name: str):
    def decorator(factory: Callable[[argparse.Namespace], Suite]):
        SUITES[name] = factory
        return factory

    return decorator


def _train_section(path: Path) -> dict[str, Any]:
    """``params.yaml``'s ``train`` section, or ``{}`` when the file or the section is absent."""
    if not path.is_file():
        return {}
    import yaml

    section = (yaml.safe_load(path.read_text()) or {}).get("train") or {}
    if not isinstance(section, dict):
        raise ValueError(f"{path}: the train section must be a mapping of TrainConfig fields, got {section!r}")
    return section


@register_suite("cpu-tiny")
def _cpu_tiny(args: argparse.Namespace) -> Suite:
    from linear_moe.components.train.config import TrainConfig

    keys = ("preset", "model_overrides", "seq_length", "micro_batch_size", "global_batch_size")
    section = _train_section(args.params)
    config = TrainConfig(**{k: section[k] for k in keys if k in section})
    if args.seq_length:
        config.seq_length = args.seq_length
    if args.micro_batch_size:
        config.micro_batch_size = config.global_batch_size = args.micro_batch_size
    config.data_parallel(1)  # global batch must be a multiple of the micro-batch
    source = f"{args.params} train section" if section else "TrainConfig defaults (no train section in params.yaml)"
    case = Case(name=f"{config.preset}/T{config.seq_length}", group="default",
                model_overrides={**config.model_overrides, **args.model_overrides},
                seq_length=config.seq_length, micro_batch_size=config.micro_batch_size,
                num_microbatches=config.global_batch_size // config.micro_batch_size, preset=config.preset)
    return Suite(cases=[case], dtype=torch.float32,
                 compares=(f"nothing side by side: one case, the training throughput of preset {config.preset!r} "
                           f"at the trainer's shapes ({source})"),
                 notes=[f"shapes from {source}"])


#: ``--mixers`` entry -> (group, ModelConfig overrides for a model of ``layers`` layers). Any other
#: entry is an LSM mixer name from the mixer registry, in a pure-LSM pattern.
VARIANTS: dict[str, Callable[[int], tuple[str, dict[str, Any]]]] = {
    "softmax": lambda layers: ("softmax", dict(layer_pattern="A" * layers)),
}


def _variant(name: str, layers: int) -> tuple[str, dict[str, Any]]:
    lsm = lambda n: ("lsm", dict(lsm_mixer=name, layer_pattern="L" * n))  # noqa: E731
    return VARIANTS.get(name, lsm)(layers)


@register_suite("gpu-lengths")
def _gpu_lengths(args: argparse.Namespace) -> Suite:
    cases = []
    for mixer in args.mixers:
        group, overrides = _variant(mixer, args.layers)
        for T in args.lengths:
            if args.tokens_per_step % T:
                raise ValueError(f"--tokens-per-step {args.tokens_per_step} is not a multiple of length {T}")
            overrides_T = {"num_layers": args.layers, "max_position_embeddings": max(args.lengths), **overrides,
                           **args.model_overrides}
            cases.append(Case(name=f"{mixer}/T{T}", group=group, model_overrides=overrides_T, seq_length=T,
                              micro_batch_size=args.tokens_per_step // T, preset="A0.3B-2B"))
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    return Suite(
        cases=cases, dtype=dtype,
        compares=(f"tokens/s of pure-LSM models ({', '.join(m for m in args.mixers if m != 'softmax')}) against the "
                  f"same model with softmax attention in every layer, at sequence lengths {args.lengths} with "
                  f"{args.tokens_per_step} tokens per step (micro-batch = tokens / length)"),
        notes=[f"A0.3B-2B shapes (hidden 1024, 8 heads, 64 experts, top-8, expert FFN 896, vocab 32000) with "
               f"num_layers reduced from 12 to {args.layers} to fit one GPU",
               "one micro-batch per step; the trainer's default optimizer (torch AdamW over the bf16 parameters)",
               "experts: " + ("megatron's GroupedMLP (grouped GEMM)" if args.grouped_gemm else
                              "megatron's SequentialMLP (one MLP per expert)"),
               "softmax layers: the project's attention mixer (SDPA with an explicit boolean causal mask, so no "
               "FlashAttention kernel)"]
        + ([f"model overrides from --model-overrides: {args.model_overrides}"] if args.model_overrides else []),
        summarise=summarise_lengths,
    )


def summarise_lengths(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per mixer: tokens/s by length, max/min over lengths, the drop from shortest to longest length;
    and per length, each LSM mixer's tokens/s over the softmax baseline's."""
    by_mixer: dict[str, dict[int, float]] = {}
    not_ok: dict[str, dict[str, str]] = {}
    for row in rows:
        if row["status"] == "ok":
            by_mixer.setdefault(row["mixer_key"], {})[row["seq_length"]] = row["tokens_per_s"]
        else:
            not_ok.setdefault(row["mixer_key"], {})[str(row["seq_length"])] = row["status"]
    summary: dict[str, Any] = {mixer: {"lengths_not_ok": failed} for mixer, failed in not_ok.items()}
    for mixer, tps in by_mixer.items():
        lengths = sorted(tps)
        summary.setdefault(mixer, {}).update({
            "tokens_per_s": {str(T): tps[T] for T in lengths},
            "max_over_min": max(tps.values()) / min(tps.values()),
            "longest_over_shortest": tps[lengths[-1]] / tps[lengths[0]],
            "drop_shortest_to_longest": 1 - tps[lengths[-1]] / tps[lengths[0]],
            "lengths_measured": lengths,
        })
    baseline = by_mixer.get("softmax", {})
    for mixer, tps in by_mixer.items():
        if mixer != "softmax":
            summary[mixer]["over_softmax"] = {str(T): tps[T] / baseline[T] for T in sorted(tps) if T in baseline}
    return summary


# ----------------------------------------------------------------------------------- device setup
# ----------------------------------------------------------------------------------- one case
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def _timed_steps(case: Case, args: argparse.Namespace, row: dict[str, Any]) -> None:
    """Build, warm up, time; fills ``row``. Everything it allocates dies with its frame."""
    from linear_moe.components.train.config import TrainConfig
    from linear_moe.components.train.data import random_batches
    from linear_moe.components.train.optim import build_optimizer
    from linear_moe.components.train.step import TrainingModel

    device = args.torch_device
    train_config = TrainConfig(preset=case.preset, model_overrides=case.model_overrides, seq_length=case.seq_length,
                               micro_batch_size=case.micro_batch_size, global_batch_size=case.micro_batch_size * case.num_microbatches,
                               seed=args.seed, lr=1e-4, min_lr=1e-5, weight_decay=0.1, grad_clip=1.0,
                               moe_grouped_gemm=args.grouped_gemm)
    model_config = train_config.model_config()
    row.update(model_config=model_config.to_dict(), layer_pattern=model_config.layer_pattern,
               mixer=model_config.lsm_mixer if case.group != "softmax" else "attention")
    torch.manual_seed(args.seed)
    model = TrainingModel.from_config(train_config)
    row["params"] = sum(p.numel() for p in model.parameters())
    row["moe_grouped_gemm"] = bool(getattr(model.config, "moe_grouped_gemm", False))
    row["params_dtype"] = str(model.config.params_dtype).removeprefix("torch.")
    optimizer = build_optimizer(model.chunks, train_config)
    row["optimizer"] = type(optimizer).__name__
    generator = torch.Generator().manual_seed(args.seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses, times, cpu_times = [], [], []
    for i in range(args.warmup + args.steps):
        batches = random_batches(case.num_microbatches, batch_size=case.micro_batch_size, seq_length=case.seq_length,
                                 vocab_size=model_config.vocab_size, generator=generator, device=device)
        _sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        loss, _moe_stats = model.train_step(batches, optimizer)
        _sync(device)
        elapsed, cpu_elapsed = time.perf_counter() - start, time.process_time() - cpu_start
        losses.append(float(loss))
        if i >= args.warmup:
            times.append(elapsed)
            cpu_times.append(cpu_elapsed)
    median_s = statistics.median(times)
    row.update(status="ok", step_fn="trainer", step_s=times, median_step_s=median_s,
               tokens_per_s=case.tokens_per_step / median_s, peak_memory_mb=_peak_memory_mb(device), losses=losses,
               step_cpu_s=cpu_times, median_step_cpu_s=statistics.median(cpu_times), min_step_s=min(times))


def base_row(case: Case, args: argparse.Namespace, status: str) -> dict[str, Any]:
    """A case's row with every :data:`CASE_KEYS` entry; measurements empty until the case runs."""
    lsm_mixer = case.model_overrides.get("lsm_mixer", "gla")
    return {
        "name": case.name, "group": case.group, "mixer": lsm_mixer if case.group == "lsm" else "attention",
        "mixer_key": case.name.split("/")[0], "layer_pattern": case.model_overrides.get("layer_pattern"),
        "seq_length": case.seq_length, "micro_batch_size": case.micro_batch_size,
        "num_microbatches": case.num_microbatches, "tokens_per_step": case.tokens_per_step, "status": status,
        "step_fn": "trainer", "step_s": [], "median_step_s": None, "tokens_per_s": None, "peak_memory_mb": None,
        "losses": [], "model_config": None,
    }


def run_case(case: Case, args: argparse.Namespace) -> dict[str, Any]:
    """One case; an OOM or any other error is recorded in the row instead of raised."""
    row = base_row(case, args, "error")
    started = time.perf_counter()
    try:
        _timed_steps(case, args, row)
    except Exception as err:
        row["status"] = "oom" if _is_oom(err) else "error"
        row["error"] = f"{type(err).__name__}: {err}"[:1000]
        if row["status"] == "error":
            row["traceback"] = traceback.format_exc()[-3000:]
    gc.collect()
    if args.torch_device.type == "cuda":
        torch.cuda.empty_cache()
    row["wall_s"] = time.perf_counter() - started
    return row


def _format_row(row: dict[str, Any]) -> str:
    head = f"{row['name']:>24} B={row['micro_batch_size']:>3} T={row['seq_length']:>6}"
    if row["status"] != "ok":
        return f"{head}  {row['status']}: {row.get('error', row.get('reason', ''))[:200]}"
    return (f"{head}  {row['tokens_per_s']:12.1f} tok/s  step {row['median_step_s'] * 1e3:9.1f} ms  "
            f"peak {row['peak_memory_mb']:9.1f} MiB  loss {row['losses'][0]:.3f}->{row['losses'][-1]:.3f}")


# ----------------------------------------------------------------------------------- entry
def _version(dist_name: str) -> str | None:
    try:
        return metadata.version(dist_name)
    except metadata.PackageNotFoundError:
        return None


def _versions() -> dict[str, Any]:
    fla_version = None
    with contextlib.suppress(Exception):
        import fla

        fla_version = getattr(fla, "__version__", None) or _version("fla-core")
    return {"python": platform.python_version(), "torch": torch.__version__, "fla": fla_version,
            "triton": _version("triton"),
            "megatron_core": _version("megatron-core"), "cuda": torch.version.cuda,
            "autotune_configs": current_limit()}  # None: Triton tuned every kernel fully (kernels.autotune)


def _int_list(text: str) -> list[int]:
    return sorted(int(x) for x in text.split(",") if x.strip())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="JSON file to write")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--suite", default="cpu-tiny", choices=sorted(SUITES))
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per case (compilation, autotuning)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per case (default 5 cpu-tiny, 3 gpu-lengths)")
    p.add_argument("--budget-s", type=float, default=None, help="skip cases that would start after this many seconds")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (cpu)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--model-overrides", type=json.loads, default={}, help="JSON of ModelConfig fields over every case")
    # cpu-tiny
    p.add_argument("--params", type=Path, default=REPO_ROOT / "params.yaml",
                   help="cpu-tiny: shapes from its train section")
    p.add_argument("--seq-length", type=int, default=None, help="cpu-tiny: override the sequence length")
    p.add_argument("--micro-batch-size", type=int, default=None, help="cpu-tiny: override the batch (one micro-batch)")
    # gpu-lengths
    p.add_argument("--lengths", type=_int_list, default=[2048, 4096, 8192, 16384], help="gpu-lengths: sequence lengths")
    p.add_argument("--tokens-per-step", type=int, default=32768, help="gpu-lengths: held fixed across lengths")
    p.add_argument("--layers", type=int, default=4, help="gpu-lengths: layers of the A0.3B-2B-shaped model")
    p.add_argument("--mixers", default="gla,softmax,gated_deltanet",
                   help="gpu-lengths: LSM mixer names and/or 'softmax' (all-attention baseline), in run order")
    p.add_argument("--grouped-gemm", action="store_true",
                   help="megatron's grouped-GEMM experts (TrainConfig.moe_grouped_gemm; bf16, so GPU) instead of "
                        "one MLP per expert")
    args = p.parse_args(argv)
    args.mixers = [m.strip() for m in args.mixers.split(",") if m.strip()]
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch.cuda.is_available() is False")
    if args.device == "cpu" and torch.cuda.is_available():
        p.error("--device cpu: the megatron assembly builds on CUDA whenever it is available; "
                "hide the GPU with CUDA_VISIBLE_DEVICES= or use --device cuda")
    if not isinstance(args.model_overrides, dict):
        p.error(f"--model-overrides must be a JSON object of ModelConfig fields, got {args.model_overrides!r}")
    if args.steps is None:
        args.steps = 5 if args.suite == "cpu-tiny" else 3
    if args.steps < 1 or args.warmup < 0:
        p.error(f"--steps must be >= 1 and --warmup >= 0, got {args.steps} and {args.warmup}")
    args.torch_device = torch.device(args.device)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    suite = SUITES[args.suite](args)
    device = args.torch_device
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()

    def write(complete: bool) -> dict[str, Any]:
        payload = {
            "benchmark": "bench_train",
            "complete": complete,
            "suite": args.suite,
            "compares": suite.compares,
            "device": args.device,
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
            else (platform.processor() or platform.machine()),
            "dtype": str(suite.dtype).removeprefix("torch."),
            "versions": _versions(),
            "method": {
                "statistic": "median", "warmup_steps": args.warmup, "timed_steps": args.steps,
                "tokens_per_s": "tokens_per_step / median step seconds (each step CUDA-synchronised on both ends)",
                "step": "TrainingModel.train_step (megatron schedule, DDP, grad clip 1.0, the trainer's default "
                        "optimizer: torch AdamW), world of one",
                "peak_memory_mb": "torch.cuda.max_memory_allocated since the model was built" if device.type == "cuda"
                else "ru_maxrss: the process's high-water mark so far (never decreases across cases)",
                "data": "synthetic: uniformly random token ids, labels = next id",
                "step_cpu_s": "process CPU seconds per step (all threads; robust to other processes on shared cores)",
                "threads": torch.get_num_threads(),
            },
            "notes": suite.notes,
            "cases": rows,
            "summary": suite.summarise(rows),
            "wall_s": time.perf_counter() - started,
        }
        atomic_write_json(args.out, payload)
        return payload

    with world_of_one():
        for case in suite.cases:
            elapsed = time.perf_counter() - started
            if args.budget_s is not None and elapsed > args.budget_s:
                rows.append({**base_row(case, args, "skipped"),
                             "reason": f"--budget-s {args.budget_s:g} spent ({elapsed:.0f} s elapsed)"})
            else:
                rows.append(run_case(case, args))
            print(_format_row(rows[-1]), flush=True)
            write(complete=False)  # a run cut short keeps what it measured
    payload = write(complete=True)
    print(json.dumps(payload["summary"], indent=2), flush=True)
    return payload


if __name__ == "__main__":
    main()
