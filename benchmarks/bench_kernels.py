"""Time the linear-attention cores: chunked vs naive vs quadratic (and fla / SDPA on CUDA).

    python -m benchmarks.bench_kernels --out benchmarks/results/kernels_cpu.json
    python -m benchmarks.bench_kernels --device cuda --ops gla,delta_rule --out kernels_cuda.json

Shapes: B=1, H=4, K=V=64 (``--batch``/``--heads``/``--head-dim``), T in ``--seq-lens``.
``--mode forward`` times the forward under ``torch.no_grad``; ``--mode train`` times forward plus
backward (gradients for every input), as training runs it. Each case reports the median of
``--repeats`` timed samples after one warm-up, the repeats taken round-robin over the lengths. With
``--paired-repeats N`` (CUDA), our fla dispatch and fla called directly are also timed in
alternating samples on the same inputs, N rounds per length (:func:`run_paired`): the dispatch
overhead criterion uses these. A
sample is one call on CPU; on CUDA it is ``triton.testing.do_bench``'s median over many calls (L2
flushed between calls), so a small kernel's launch latency is not mistaken for its cost. A length
whose predicted time (extrapolated from the last measured length by the case's cost exponent: 1 for
recurrences, 2 for T x T forms) times the calls exceeds ``--max-seconds`` is skipped, with the
reason recorded. On CUDA the peak allocated memory of each case is recorded too. The JSON is
written atomically (temp file, then ``os.replace``).

Ops are a registry: :func:`register_op` adds an :class:`OpSpec` (input factory + cases), so another
kernel joins with ``--ops name``.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

import torch.nn.functional as F

from benchmarks.common import cuda_seconds
from linear_moe.components.files import atomic_write_json
from linear_moe.kernels.autotune import current_limit
from linear_moe.kernels.backend import fla_gated_backward_refused

Inputs = dict[str, Any]
ROLES = ("chunk", "naive", "quadratic", "fla", "fla_direct", "sdpa")


@dataclass(frozen=True)
class Case:
    """One timed call: ``build(inputs)`` returns a zero-argument thunk that runs the op once."""

    name: str  # unique within its op, e.g. "chunk_diagonal"
    role: str  # one of ROLES (summary ratios key on it)
    variant: str  # decay variant the inputs are made for, e.g. "scalar", "diagonal"
    build: Callable[[Inputs], Callable[[], Any]]
    cost_exponent: int = 1  # time ~ T ** cost_exponent, for the skip prediction
    devices: tuple[str, ...] = ("cpu", "cuda")


@dataclass(frozen=True)
class OpSpec:
    """An op family: ``make_inputs(T, variant, args) -> Inputs`` plus its cases."""

    make_inputs: Callable[[int, str, argparse.Namespace], Inputs]
    cases: list[Case] = field(default_factory=list)


OPS: dict[str, Callable[[], OpSpec]] = {}


def register_op(name: str) -> Callable[[Callable[[], OpSpec]], Callable[[], OpSpec]]:
    """Decorator: a zero-argument factory (lazy, so unavailable kernels fail only when selected)."""

    def decorator(factory: Callable[[], OpSpec]) -> Callable[[], OpSpec]:
        OPS[name] = factory
        return factory

    return decorator


def _rand(args: argparse.Namespace, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, device=args.device, dtype=args.torch_dtype)


def _as_leaves(inputs: Inputs, args: argparse.Namespace) -> Inputs:
    """In ``--mode train`` every floating input becomes a leaf that requires its gradient."""
    if args.mode != "train":
        return inputs
    return {name: t.detach().requires_grad_() if torch.is_tensor(t) and t.is_floating_point() else t
            for name, t in inputs.items()}


def _timed(op_call: Callable[[], Any], inputs: Inputs, args: argparse.Namespace) -> Callable[[], Any]:
    """The thunk a sample times: ``op_call()`` alone, or (``--mode train``) its forward and a backward
    of a fixed random output gradient into every input (gradients reset first, not accumulated)."""
    if args.mode != "train":
        return op_call
    leaves = [t for t in inputs.values() if torch.is_tensor(t) and t.requires_grad]
    grad_out: list[torch.Tensor] = []

    def forward_backward():
        for t in leaves:
            t.grad = None
        out = op_call()
        out = out[0] if isinstance(out, tuple) else out  # (output, final state) -> output
        if not grad_out:
            grad_out.append(torch.randn_like(out))
        out.backward(grad_out[0])

    return forward_backward


def _sdpa_case(variant: str) -> Case:
    def build(x: Inputs):
        q, k, v = (x[n].transpose(1, 2) for n in ("q", "k", "v"))  # SDPA is head-first
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)

    return Case("sdpa_causal", "sdpa", variant, build, cost_exponent=2, devices=("cuda",))


# --- gla ------------------------------------------------------------------------------------------


def _quadratic_scalar_gla(q, k, v, g, scale):
    """Reference T x T form for scalar decay: (q k^T * exp(b_i - b_j), masked) @ v, per head."""
    b_BHT = g.double().cumsum(1).transpose(1, 2)
    T = q.shape[1]
    causal_TT = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    decay_BHTT = (b_BHT[..., :, None] - b_BHT[..., None, :]).masked_fill(~causal_TT, float("-inf")).exp()
    scores_BHTT = torch.einsum("bthk,bshk->bhts", q.float(), k.float()) * decay_BHTT.float() * scale
    return torch.einsum("bhts,bshv->bthv", scores_BHTT, v.float())


@register_op("gla")
def _gla_spec() -> OpSpec:
    from linear_moe.kernels.gla import gla

    def make_inputs(T: int, variant: str, args: argparse.Namespace) -> Inputs:
        B, H, D = args.batch, args.heads, args.head_dim
        g_shape = {"scalar": (B, T, H), "diagonal": (B, T, H, D)}[variant]
        g = F.logsigmoid(torch.randn(*g_shape, device=args.device) + 3.0).to(args.torch_dtype)
        return _as_leaves(dict(q=_rand(args, B, T, H, D), k=_rand(args, B, T, H, D), v=_rand(args, B, T, H, D),
                               g=g), args)

    def backend_case(backend: str, variant: str, role: str, devices=("cpu", "cuda")) -> Case:
        def build(x: Inputs):
            return lambda: gla(x["q"], x["k"], x["v"], x["g"], output_final_state=True, backend=backend)

        return Case(f"{backend}_{variant}", role, variant, build, devices=devices)

    def fla_direct(variant: str) -> Case:
        """The fla op our dispatch calls, called directly (``chunk_gla`` for scalar decay too where fla
        refuses ``chunk_simple_gla``'s backward: ``kernels.backend.fla_gated_backward_refused``)."""
        def build(x: Inputs):
            if variant == "diagonal" or fla_gated_backward_refused():
                from fla.ops.gla import chunk_gla

                if variant == "diagonal":
                    return lambda: chunk_gla(x["q"], x["k"], x["v"], g=x["g"], output_final_state=True)
                return lambda: chunk_gla(x["q"], x["k"], x["v"], g=x["g"][..., None].expand(x["q"].shape).contiguous(),
                                         output_final_state=True)
            from fla.ops.simple_gla import chunk_simple_gla

            return lambda: chunk_simple_gla(x["q"], x["k"], x["v"], g=x["g"], output_final_state=True)

        return Case(f"fla_direct_{variant}", "fla_direct", variant, build, devices=("cuda",))

    def quadratic(x: Inputs):
        return lambda: _quadratic_scalar_gla(x["q"], x["k"], x["v"], x["g"], x["q"].shape[-1] ** -0.5)

    cases = []
    for variant in ("scalar", "diagonal"):
        cases += [backend_case("chunk", variant, "chunk"), backend_case("naive", variant, "naive"),
                  backend_case("fla", variant, "fla", devices=("cuda",)), fla_direct(variant)]
    # the (T, T, K) diagonal form would need T*T*K*H floats (4 GiB at T=2048): scalar only
    cases += [Case("quadratic_scalar", "quadratic", "scalar", quadratic, cost_exponent=2), _sdpa_case("scalar")]
    return OpSpec(make_inputs, cases)


# --- delta rule ------------------------------------------------------------------------------------


@register_op("delta_rule")
def _delta_rule_spec() -> OpSpec:
    from linear_moe.kernels.delta_rule import delta_rule

    def make_inputs(T: int, variant: str, args: argparse.Namespace) -> Inputs:
        B, H, D = args.batch, args.heads, args.head_dim
        k = F.normalize(torch.randn(B, T, H, D, device=args.device), dim=-1).to(args.torch_dtype)
        beta = torch.rand(B, T, H, device=args.device).to(args.torch_dtype)
        g = F.logsigmoid(torch.randn(B, T, H, device=args.device) + 3.0).to(args.torch_dtype)
        return _as_leaves(dict(q=_rand(args, B, T, H, D), k=k, v=_rand(args, B, T, H, D), beta=beta,
                               g=g if variant == "gated" else None), args)

    def backend_case(backend: str, variant: str, role: str, devices=("cpu", "cuda")) -> Case:
        def build(x: Inputs):
            return lambda: delta_rule(x["q"], x["k"], x["v"], x["beta"], x["g"], output_final_state=True,
                                      backend=backend)

        return Case(f"{backend}_{variant}", role, variant, build, devices=devices)

    def fla_direct(variant: str) -> Case:
        """The fla op our dispatch calls, called directly (``chunk_kda`` for the gated rule where fla
        refuses ``chunk_gated_delta_rule``'s backward)."""
        def build(x: Inputs):
            if variant == "gated" and fla_gated_backward_refused():
                from fla.ops.kda import chunk_kda

                return lambda: chunk_kda(x["q"], x["k"], x["v"], x["g"][..., None].expand(x["q"].shape).contiguous(),
                                         x["beta"], output_final_state=True)
            if variant == "gated":
                from fla.ops.gated_delta_rule import chunk_gated_delta_rule

                return lambda: chunk_gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"],
                                                      output_final_state=True)
            from fla.ops.delta_rule import chunk_delta_rule

            return lambda: chunk_delta_rule(x["q"], x["k"], x["v"], x["beta"], output_final_state=True)

        return Case(f"fla_direct_{variant}", "fla_direct", variant, build, devices=("cuda",))

    cases = []
    for variant in ("plain", "gated"):
        cases += [backend_case("chunk", variant, "chunk"), backend_case("naive", variant, "naive"),
                  backend_case("fla", variant, "fla", devices=("cuda",)), fla_direct(variant)]
    cases.append(_sdpa_case("plain"))
    return OpSpec(make_inputs, cases)


# --- timing ----------------------------------------------------------------------------------------


def time_call(thunk: Callable[[], Any], args: argparse.Namespace) -> tuple[float, float | None, int | None]:
    """One timed sample: seconds per call, process CPU seconds (CPU), peak allocated bytes (CUDA).

    On CPU a sample is one call; process CPU time is robust to other processes sharing the cores,
    wall time is what users see. On CUDA it is ``triton.testing.do_bench``'s median over about
    ``--cuda-rep-ms`` of back-to-back calls.
    """
    grad_mode = torch.enable_grad() if args.mode == "train" else torch.no_grad()
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        with grad_mode:
            seconds = cuda_seconds(thunk, args.cuda_rep_ms)
        return seconds, None, torch.cuda.max_memory_allocated()
    start, cpu_start = time.perf_counter(), time.process_time()
    with grad_mode:
        thunk()
    return time.perf_counter() - start, time.process_time() - cpu_start, None


def _sample_seconds(per_call_s: float, args: argparse.Namespace) -> float:
    """Predicted seconds of one sample: one call on CPU; on CUDA do_bench's 5 estimating calls, then
    at least one warm-up and one timed call, or its ``rep`` budget."""
    if args.device != "cuda":
        return per_call_s
    return 5 * per_call_s + max(2 * per_call_s, 1.25 * args.cuda_rep_ms / 1e3)


def run_case(op: str, case: Case, spec: OpSpec, args: argparse.Namespace) -> list[dict[str, Any]]:
    """One case at every T: a warm-up and a first timed call per T (shortest first; lengths predicted
    to take too long are skipped), then the remaining repeats round-robin over the lengths, so that
    drifting machine load hits every T alike."""
    rows, thunks, samples = [], {}, {}
    last: tuple[int, float] | None = None  # (T, seconds) of the longest length measured so far
    for T in args.seq_lens:
        row: dict[str, Any] = {"op": op, "case": case.name, "role": case.role, "variant": case.variant, "T": T}
        rows.append(row)
        predicted = None if last is None else last[1] * (T / last[0]) ** case.cost_exponent
        if predicted is not None and _sample_seconds(predicted, args) * (args.repeats + 1) > args.max_seconds:
            row["skipped"] = (f"predicted {predicted:.1f} s per call (T^{case.cost_exponent} from {last[1]:.2f} s "
                              f"at T={last[0]}) x {args.repeats + 1} samples > --max-seconds {args.max_seconds:g}")
            continue
        try:
            inputs = spec.make_inputs(T, case.variant, args)
            thunk = _timed(case.build(inputs), inputs, args)
            time_call(thunk, args)  # warm-up: compilation, autotuning, allocator, caches
            samples[T] = [time_call(thunk, args)]
        except (RuntimeError, ImportError, NotImplementedError, ValueError) as err:
            row["skipped"] = f"{type(err).__name__}: {err}"[:300]
            continue
        thunks[T] = thunk
        last = (T, samples[T][0][0])
    for _ in range(args.repeats - 1):
        for T, thunk in thunks.items():
            samples[T].append(time_call(thunk, args))
    for row in rows:
        if row["T"] in samples:
            walls, cpus, peaks = zip(*samples[row["T"]])
            row |= {"median_s": statistics.median(walls), "times_s": list(walls)}
            if args.device == "cuda":
                row["peak_mem_bytes"] = max(peaks)
            else:
                row["median_cpu_s"] = statistics.median(cpus)
        print(_format_row(row), flush=True)
    thunks.clear()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return rows


def run_paired(op: str, spec: OpSpec, first: Case, second: Case, args: argparse.Namespace) -> list[dict[str, Any]]:
    """``first`` against ``second`` on the same inputs, samples alternating (the order swapped each
    round), ``--paired-repeats`` rounds per T: machine drift and the host's launch-rate jitter (which
    sets the time of a short, launch-bound call) hit both alike. Reports both medians, their ratio, and
    the median of the per-round ratios."""
    rows = []
    for T in args.seq_lens:
        row: dict[str, Any] = {"op": op, "variant": first.variant, "T": T, "first": first.name, "second": second.name}
        try:
            inputs = spec.make_inputs(T, first.variant, args)
            thunks = [_timed(first.build(inputs), inputs, args), _timed(second.build(inputs), inputs, args)]
            for thunk in thunks:
                time_call(thunk, args)  # warm-up
            samples: list[list[float]] = [[], []]
            for i in range(args.paired_repeats):
                for j in ((0, 1) if i % 2 == 0 else (1, 0)):
                    samples[j].append(time_call(thunks[j], args)[0])
        except (RuntimeError, ImportError, NotImplementedError, ValueError) as err:
            row["skipped"] = f"{type(err).__name__}: {err}"[:300]
            rows.append(row)
            continue
        medians = [statistics.median(x) for x in samples]
        row |= {"first_median_s": medians[0], "second_median_s": medians[1], "ratio_of_medians": medians[0] / medians[1],
                "median_of_round_ratios": statistics.median(a / b for a, b in zip(*samples)),
                "first_times_s": samples[0], "second_times_s": samples[1]}
        print(f"{op:>10} paired {first.name} / {second.name} T={T:>5}  {medians[0] * 1e3:.3f} / "
              f"{medians[1] * 1e3:.3f} ms = {row['ratio_of_medians']:.4f} (median of rounds "
              f"{row['median_of_round_ratios']:.4f})", flush=True)
        rows.append(row)
        if args.device == "cuda":
            torch.cuda.empty_cache()
    return rows


def _format_row(row: dict[str, Any]) -> str:
    head = f"{row['op']:>10} {row['case']:>22} T={row['T']:>5}"
    if "skipped" in row:
        return f"{head}  skipped: {row['skipped']}"
    mem = f"  peak {row['peak_mem_bytes'] / 2**20:.0f} MiB" if "peak_mem_bytes" in row else ""
    cpu = f"  (cpu {row['median_cpu_s'] * 1e3:.2f} ms)" if "median_cpu_s" in row else ""
    return f"{head}  {row['median_s'] * 1e3:10.2f} ms{cpu}{mem}"


def summarise(rows: list[dict[str, Any]], args: argparse.Namespace,
              paired: list[dict[str, Any]] = ()) -> dict[str, Any]:
    """naive/chunk at ``--ratio-T``, chunk(T_max)/chunk(T_max/2); on CUDA our fla dispatch over fla
    called directly (separate cases, and paired: :func:`run_paired`) and over SDPA at each length."""
    def median(op, role, variant, T, key="median_s"):
        for r in rows:
            if (r["op"], r["role"], r["variant"], r["T"]) == (op, role, variant, T) and key in r:
                return r[key]
        return None

    def ratio(a, b):
        return None if a is None or b is None else a / b

    summary: dict[str, Any] = {}
    T_top = max(args.seq_lens)
    T_half = T_top // 2 if T_top // 2 in args.seq_lens else None
    for op, variant in sorted({(r["op"], r["variant"]) for r in rows}):
        s = {
            f"naive_over_chunk_T{args.ratio_t}": ratio(median(op, "naive", variant, args.ratio_t),
                                                       median(op, "chunk", variant, args.ratio_t)),
            f"chunk_T{T_top}_over_T{T_half}": ratio(median(op, "chunk", variant, T_top),
                                                    median(op, "chunk", variant, T_half)),
        }
        if args.device == "cpu":
            s[f"cpu_time_naive_over_chunk_T{args.ratio_t}"] = ratio(
                median(op, "naive", variant, args.ratio_t, "median_cpu_s"),
                median(op, "chunk", variant, args.ratio_t, "median_cpu_s"))
            s[f"cpu_time_chunk_T{T_top}_over_T{T_half}"] = ratio(median(op, "chunk", variant, T_top, "median_cpu_s"),
                                                                 median(op, "chunk", variant, T_half, "median_cpu_s"))
        if args.device == "cuda":  # per length: {T: ratio}
            s["fla_dispatch_over_direct"] = {T: ratio(median(op, "fla", variant, T), median(op, "fla_direct", variant, T))
                                             for T in args.seq_lens}
            s["fla_over_sdpa"] = {T: ratio(median(op, "fla", variant, T), median(op, "sdpa", variant, T))
                                  for T in args.seq_lens}
            pairs = {r["T"]: r["ratio_of_medians"] for r in paired
                     if (r["op"], r["variant"]) == (op, variant) and "ratio_of_medians" in r}
            if pairs:  # the overhead criterion on the paired figures, at every length measured
                s["fla_dispatch_over_direct_paired"] = pairs
                s["meets_dispatch_overhead_le_5pct"] = all(x <= 1.05 for x in pairs.values())
            else:
                s["meets_dispatch_overhead_le_5pct"] = _check(s["fla_dispatch_over_direct"][T_top],
                                                              lambda x: x <= 1.05)
        s["meets_naive_over_chunk_ge_5"] = _check(s[f"naive_over_chunk_T{args.ratio_t}"], lambda x: x >= 5)
        s["meets_chunk_scaling_le_2.2"] = _check(s[f"chunk_T{T_top}_over_T{T_half}"], lambda x: x <= 2.2)
        summary[f"{op}/{variant}"] = s
    return summary


def _check(value, predicate):
    return None if value is None else bool(predicate(value))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="JSON file to write")
    p.add_argument("--ops", default="gla", help=f"comma-separated, from {sorted(OPS)}")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--roles", default=",".join(ROLES),
                   help=f"comma-separated case roles to run, from {list(ROLES)} (e.g. drop naive at large shapes)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="default float32 on cpu, bfloat16 on cuda")
    p.add_argument("--mode", default="forward", choices=["forward", "train"],
                   help="forward: forward under no_grad; train: forward + backward into every input")
    p.add_argument("--seq-lens", default="1024,2048,4096,8192")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cuda-rep-ms", type=int, default=100,
                   help="CUDA: milliseconds of calls per sample (triton.testing.do_bench's rep)")
    p.add_argument("--paired-repeats", type=int, default=0,
                   help="CUDA: also time our fla dispatch against fla called directly in alternating samples, "
                        "this many rounds per length (0: off)")
    p.add_argument("--max-seconds", type=float, default=30.0, help="skip a case predicted to exceed this")
    p.add_argument("--ratio-t", type=int, default=4096, help="T of the naive/chunk ratio")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (cpu)")
    args = p.parse_args(argv)
    args.seq_lens = sorted(int(t) for t in args.seq_lens.split(","))
    args.ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    args.roles = [r.strip() for r in args.roles.split(",") if r.strip()]
    if set(args.roles) - set(ROLES):
        p.error(f"--roles: unknown {sorted(set(args.roles) - set(ROLES))}; roles are {list(ROLES)}")
    unknown = [o for o in args.ops if o not in OPS]
    if unknown:
        p.error(f"--ops: unknown {unknown}; registered ops are {sorted(OPS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch.cuda.is_available() is False")
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    args.torch_dtype = getattr(torch, args.dtype)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows: list[dict[str, Any]] = []
    paired: list[dict[str, Any]] = []
    errors: dict[str, str] = {}

    def write(complete: bool) -> dict[str, Any]:
        payload = {
            "config": {
                "device": args.device,
                "device_name": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor()
                or platform.machine(),
                "dtype": args.dtype, "B": args.batch, "H": args.heads, "K": args.head_dim, "V": args.head_dim,
                "seq_lens": args.seq_lens, "repeats": args.repeats, "statistic": "median",
                "threads": torch.get_num_threads(), "torch": torch.__version__, "max_seconds": args.max_seconds,
                "autotune_configs": current_limit(),  # None: Triton tuned every kernel fully (kernels.autotune)
                "mode": {"forward": "forward only, torch.no_grad, output_final_state=True",
                         "train": "forward + backward of a random output gradient into every input, "
                                  "output_final_state=True"}[args.mode],
                "sample": ("triton.testing.do_bench median over ~%d ms of calls" % args.cuda_rep_ms
                           if args.device == "cuda" else "one call"),
            },
            "complete": complete,
            "results": rows,
            "paired": paired,
            "summary": summarise(rows, args, paired),
            "errors": errors,
        }
        atomic_write_json(args.out, payload)
        return payload

    for op in args.ops:
        try:
            spec = OPS[op]()
        except ImportError as err:
            errors[op] = f"ImportError: {err}"
            print(f"{op}: not available ({err})", flush=True)
            continue
        selected = [c for c in spec.cases if args.device in c.devices and c.role in args.roles]
        for case in selected:
            rows += run_case(op, case, spec, args)
            write(complete=False)  # a run cut short keeps what it measured
        if args.paired_repeats > 0:
            by_role = {(c.role, c.variant): c for c in selected}
            for (role, variant), case in by_role.items():
                if role == "fla" and ("fla_direct", variant) in by_role:
                    paired += run_paired(op, spec, case, by_role["fla_direct", variant], args)
                    write(complete=False)
    payload = write(complete=True)
    print(json.dumps(payload["summary"], indent=2))
    return payload


if __name__ == "__main__":
    main()
