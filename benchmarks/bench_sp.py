"""Sequence-parallel costs: communicated bytes per layer vs sequence length, and (CUDA) kernel overheads.

    python -m benchmarks.bench_sp --out benchmarks/results/sp_cpu.json
    python -m benchmarks.bench_sp --device cuda --out benchmarks/results/sp_cuda.json

Communication (``comm``), per layer and training step, for each SP size in ``--world`` and global
length in ``--seq-lens``, analytic and measured on gloo with ``count_collectives``:

* ``lasp2_gla`` / ``lasp2_delta_rule``: one all-gather of (a_r, b_r) forward, one of dS_in backward;
  independent of T;
* ``lasp2_attention`` (LASP-2H): all-gather of K and V forward, its reduce-scatter (all-to-all) backward;
* ``ring_kv``: a ring-attention style exchange passing each rank's K, V around W - 1 times (forward
  pass; its backward also circulates dK, dV).

Bytes are reported two ways: ``gathered`` (size of what an all-gather assembles on each rank, W x
payload) and ``sent_per_rank`` (what one rank puts on the wire: (W - 1) x payload for a ring
all-gather or an all-to-all, the sum of its sends for the ring exchange).

CUDA only (``--device cuda``, bf16 activations): ``sp1_overhead`` times forward+backward of plain
fla ``chunk_gla``, the SP=1 path (``lasp2_gla`` without a group) and one rank's LASP-2 compute
without communication (zero-state run + fused correction), with their ratios to plain fla;
``correction`` times the Triton state correction against its PyTorch reference, and ``compose`` the
Triton prefix and suffix compositions against theirs (per SP size in ``--world``, diagonal and delta-rule
transitions). Each CUDA figure is
``triton.testing.do_bench``'s median over ``--cuda-rep-ms`` of calls. The JSON is written atomically
(temp file, then ``os.replace``) after every section, so a run cut short keeps what it measured.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from benchmarks.common import cuda_seconds
from linear_moe.components.files import atomic_write_json
from linear_moe.kernels.autotune import current_limit


# ---------------------------------------------------------------------------------- analytic sizes
def analytic_bytes(kind: str, W: int, T: int, B: int, H: int, K: int, V: int, itemsize: int) -> dict[str, int]:
    """Per-rank bytes of one layer's forward (and backward) exchange; T is the global length."""
    t_local = T // W
    if kind in ("lasp2_gla", "lasp2_delta_rule"):
        a = K if kind == "lasp2_gla" else K * K
        fwd_payload, bwd_payload = B * H * (K * V + a) * 4, B * H * K * V * 4  # states travel in fp32
        return {"fwd_gathered": W * fwd_payload, "bwd_gathered": W * bwd_payload,
                "fwd_sent_per_rank": (W - 1) * fwd_payload, "bwd_sent_per_rank": (W - 1) * bwd_payload}
    kv = B * t_local * H * (K + V) * itemsize
    if kind == "lasp2_attention":
        return {"fwd_gathered": W * kv, "fwd_sent_per_rank": (W - 1) * kv, "bwd_sent_per_rank": (W - 1) * kv}
    if kind == "ring_kv":
        return {"fwd_sent_per_rank": (W - 1) * kv, "bwd_sent_per_rank": 2 * (W - 1) * kv}
    raise ValueError(f"unknown kind {kind!r}")


# ---------------------------------------------------------------------------------- measured on gloo
def _ring_kv(k, v, group):
    """Pass K, V around the ring W - 1 times (what ring attention does per layer, forward)."""
    W, rank = dist.get_world_size(group), dist.get_rank(group)
    cur = torch.cat([k, v], dim=-1).contiguous()
    for _ in range(W - 1):
        nxt = torch.empty_like(cur)
        send = dist.isend(cur, (rank + 1) % W, group=group)
        recv = dist.irecv(nxt, (rank - 1) % W, group=group)
        send.wait()
        recv.wait()
        cur = nxt
    return cur


def _measure(kind: str, group, t_local: int, B: int, H: int, K: int, V: int) -> dict[str, int]:
    from linear_moe.model.parallel import count_collectives, lasp2_attention, lasp2_delta_rule, lasp2_gla

    q, k = torch.randn(B, t_local, H, K, requires_grad=True), torch.randn(B, t_local, H, K, requires_grad=True)
    v = torch.randn(B, t_local, H, V, requires_grad=True)
    W = dist.get_world_size(group)
    calls: dict[str, Callable[[], torch.Tensor]] = {
        "lasp2_gla": lambda: lasp2_gla(q, k, v, F.logsigmoid(torch.randn(B, t_local, H, K)), group=group,
                                       backend="chunk", lasp_backend="torch")[0],
        "lasp2_delta_rule": lambda: lasp2_delta_rule(q, F.normalize(k, dim=-1), v, torch.rand(B, t_local, H),
                                                     group=group, backend="chunk", lasp_backend="torch")[0],
        "lasp2_attention": lambda: lasp2_attention(q, k, v, group=group),
        "ring_kv": lambda: _ring_kv(k, v, group),
    }
    with count_collectives() as fwd:
        out = calls[kind]()
    measured = {"fwd_sent_per_rank": sum(r.payload_bytes * (W - 1) for r in fwd.records if r.op == "all_gather")
                + fwd.total("payload_bytes", "isend")}
    if kind != "ring_kv":
        measured["fwd_gathered"] = fwd.total("gathered_bytes", "all_gather")
        with count_collectives() as bwd:
            out.sum().backward()
        if kind in ("lasp2_gla", "lasp2_delta_rule"):
            measured["bwd_gathered"] = bwd.total("gathered_bytes", "all_gather")
        # all-to-all: a rank keeps its own 1/W of the payload and sends the rest
        measured["bwd_sent_per_rank"] = (sum(r.payload_bytes * (W - 1) for r in bwd.records if r.op == "all_gather")
                                         + sum(r.payload_bytes * (W - 1) // W for r in bwd.records
                                               if r.op == "all_to_all_single"))
    return measured


def _comm_worker(rank: int, W: int, rendezvous: str, args: dict, out_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=W)
    try:
        rows = []
        for T in args["seq_lens"]:
            for kind in ("lasp2_gla", "lasp2_delta_rule", "lasp2_attention", "ring_kv"):
                measured = _measure(kind, dist.group.WORLD, T // W, args["batch"], args["heads"], args["head_dim"],
                                    args["head_dim"])
                analytic = analytic_bytes(kind, W, T, args["batch"], args["heads"], args["head_dim"],
                                          args["head_dim"], 4)
                rows.append({"world": W, "seq_len": T, "kind": kind, "analytic": analytic, "measured": measured,
                             "measured_equals_analytic": all(measured[key] == analytic[key] for key in measured)})
        if rank == 0:
            Path(out_path).write_text(json.dumps(rows))
    finally:
        dist.destroy_process_group()


def measure_comm(args: argparse.Namespace) -> list[dict]:
    rows = []
    shape = {"seq_lens": args.seq_lens, "batch": args.batch, "heads": args.heads, "head_dim": args.head_dim}
    for W in args.world:
        bad = [T for T in args.seq_lens if T % W]
        if bad:
            raise ValueError(f"--seq-lens {bad} are not divisible by SP size {W}")
        with tempfile.TemporaryDirectory() as tmp:  # a file rendezvous: no TCP port to probe or race for
            out = Path(tmp) / "rows.json"
            mp.spawn(_comm_worker, args=(W, str(Path(tmp) / "rendezvous"), shape, str(out)), nprocs=W, join=True)
            new_rows = json.loads(out.read_text())
        for row in new_rows:
            print(f"comm W={row['world']} T={row['seq_len']:>6} {row['kind']:>16}  {row['measured']}"
                  f"  equals analytic: {row['measured_equals_analytic']}", flush=True)
        rows += new_rows
    return rows


# ---------------------------------------------------------------------------------- CUDA timings
def _print_row(row: dict) -> dict:
    """Print one measured row as ``key=value`` pairs (floats to 4 significant digits); returns it."""
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    return row


def _with_ratios(row: dict, baseline: str) -> dict:
    """``row`` plus ``<key>_over_<baseline>`` for each other timing in it, printed as it is measured."""
    row |= {f"{key[:-2]}_over_{baseline[:-2]}": row[key] / row[baseline]
            for key in list(row) if key.endswith("_s") and key != baseline}
    return _print_row(row)


def time_sp1_overhead(args: argparse.Namespace) -> list[dict]:
    """Forward+backward seconds: plain fla ``chunk_gla``, ``lasp2_gla`` without a group, one rank's LASP-2 compute."""
    from fla.ops.gla import chunk_gla

    from linear_moe.kernels.gla import gla
    from linear_moe.kernels.lasp import state_correction
    from linear_moe.model.parallel import lasp2_gla

    B, H, D = args.batch, args.heads, args.head_dim
    rows = []
    for T in args.seq_lens:
        leaves = [torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
        g = F.logsigmoid(torch.randn(B, T, H, D, device="cuda")).requires_grad_()

        def step(fn):
            def run():
                fn().float().sum().backward()
            return run

        def lasp_local():  # one rank's LASP-2 compute, communication left out (S_in = its own state)
            o, s = gla(*leaves, g, output_final_state=True, backend="fla")
            return state_correction(o, leaves[0], g.float().cumsum(1), s.detach(), D ** -0.5, backend="triton")

        rows.append(_with_ratios({
            "seq_len": T,
            "fla_chunk_gla_s": cuda_seconds(step(lambda: chunk_gla(*leaves, g)[0]), args.cuda_rep_ms),
            "lasp2_gla_sp1_s": cuda_seconds(step(lambda: lasp2_gla(*leaves, g, backend="fla")[0]), args.cuda_rep_ms),
            "lasp2_rank_compute_s": cuda_seconds(step(lasp_local), args.cuda_rep_ms)}, "fla_chunk_gla_s"))
    return rows


def time_correction(args: argparse.Namespace) -> list[dict]:
    """Seconds of the Triton state correction vs its PyTorch reference (bf16 activations, fp32 state)."""
    from linear_moe.kernels.lasp import naive_state_correction, state_correction

    B, H, D = args.batch, args.heads, args.head_dim
    rows = []
    for T in args.seq_lens:
        q, o = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        gcum = F.logsigmoid(torch.randn(B, T, H, D, device="cuda")).cumsum(1)
        s = torch.randn(B, H, D, D, device="cuda")
        leaves = [t.clone().requires_grad_() for t in (o, q, gcum, s)]

        def fwd_bwd(backend):
            def run():
                if backend == "torch":
                    out = naive_state_correction(*leaves, 0.1)
                else:
                    out = state_correction(*leaves, 0.1, backend=backend)
                out.float().sum().backward()
            return run

        rows.append(_with_ratios({
            "seq_len": T,
            "torch_fwd_s": cuda_seconds(lambda: naive_state_correction(o, q, gcum, s, 0.1), args.cuda_rep_ms),
            "triton_fwd_s": cuda_seconds(lambda: state_correction(o, q, gcum, s, 0.1, backend="triton"),
                                         args.cuda_rep_ms),
            "torch_autograd_fwd_bwd_s": cuda_seconds(fwd_bwd("torch"), args.cuda_rep_ms),
            "triton_fwd_bwd_s": cuda_seconds(fwd_bwd("triton"), args.cuda_rep_ms)}, "torch_fwd_s"))
    return rows


def time_compose(args: argparse.Namespace) -> list[dict]:
    """Seconds of the Triton prefix composition (forward) and suffix composition (backward) vs PyTorch,
    per SP size in ``--world``, for diagonal (decay) and (K, K) matrix (delta-rule) transitions."""
    from linear_moe.kernels.lasp import prefix_compose_states, suffix_compose

    N, H, D = args.batch, args.heads, args.head_dim
    rows = []
    for W in args.world:
        for matrix in (False, True):
            a = torch.randn(W, N, H, D, D, device="cuda") / D if matrix else torch.rand(W, N, H, D, device="cuda")
            b, s0 = torch.randn(W, N, H, D, D, device="cuda"), torch.randn(N, H, D, D, device="cuda")
            states = prefix_compose_states(a, b, s0, "torch")
            d_states = torch.randn_like(states)
            row = {"world": W, "transition": "matrix" if matrix else "diagonal"}
            for backend in ("torch", "triton"):
                row[f"{backend}_prefix_s"] = cuda_seconds(lambda: prefix_compose_states(a, b, s0, backend),
                                                          args.cuda_rep_ms)
                row[f"{backend}_suffix_s"] = cuda_seconds(lambda: suffix_compose(a, states, d_states, backend),
                                                          args.cuda_rep_ms)
            for op in ("prefix", "suffix"):
                row[f"triton_over_torch_{op}"] = row[f"triton_{op}_s"] / row[f"torch_{op}_s"]
            rows.append(_print_row(row))
    return rows


def measure_cuda(args: argparse.Namespace, result: dict) -> None:
    """Adds ``gpu``, ``sp1_overhead`` (the issue's first GPU figure) and ``correction`` to ``result``,
    writing it after each."""
    result["gpu"] = torch.cuda.get_device_name()
    try:
        result["sp1_overhead"] = time_sp1_overhead(args)
    except ImportError as err:  # fla is optional on a bare GPU image
        result["sp1_overhead"] = f"skipped: {err}"
    atomic_write_json(args.out, result)
    result["correction"] = time_correction(args)
    atomic_write_json(args.out, result)
    result["compose"] = time_compose(args)


# ---------------------------------------------------------------------------------- entry
def run(args: argparse.Namespace) -> dict:
    result = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "python": platform.python_version(), "torch": torch.__version__, "complete": False,
              "autotune_configs": current_limit(),  # None: Triton tuned every kernel fully (kernels.autotune)
              "comm": [] if args.skip_comm else measure_comm(args)}
    if args.device == "cuda":
        atomic_write_json(args.out, result)  # a run cut short keeps the communication figures
        measure_cuda(args, result)
    result["complete"] = True
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/sp.json"))
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--world", type=lambda s: [int(x) for x in s.split(",")], default=[2, 4])
    parser.add_argument("--seq-lens", type=lambda s: [int(x) for x in s.split(",")], default=[256, 1024])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=16)
    parser.add_argument("--cuda-rep-ms", type=int, default=100,
                        help="CUDA: milliseconds of calls behind each timing (triton.testing.do_bench's rep)")
    parser.add_argument("--skip-comm", action="store_true",
                        help="skip the communication measurement (a CPU/gloo figure), CUDA timings only")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device visible")
    result = run(args)
    atomic_write_json(args.out, result)
    bad = [r for r in result["comm"] if not r["measured_equals_analytic"]]
    print(f"wrote {args.out}: {len(result['comm'])} comm rows, {len(bad)} differing from the analytic size")
    return result


if __name__ == "__main__":
    main()
