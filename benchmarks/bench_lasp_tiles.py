"""Tile sizes and dot precision of the Triton LASP-2 state correction, side by side with PyTorch.

    python -m benchmarks.bench_lasp_tiles --out benchmarks/results/lasp_tiles.json            # CPU: compile only
    python -m benchmarks.bench_lasp_tiles --device cuda --out benchmarks/results/lasp_tiles_gpu.json

For each candidate ``CorrectionTiles`` (the production default first), at the A0.3B-2B head shape
(bf16 activations, fp32 gcum and state; ``--batch``, ``--heads``, ``--head-dim``):

* ``resources_sm90``: each kernel compiled ahead of time for sm_90a with the installed Triton: registers,
  stack frame (spills); runs anywhere;
* on CUDA, per length in ``--seq-lens``: the forward and the backward timed separately
  (``triton.testing.do_bench`` median, L2 flushed) against PyTorch's (``naive_state_correction``
  and its explicit backward, fp32 cuBLAS), with each output's relative RMS error against PyTorch.

The JSON is written atomically after every candidate, so a run cut short keeps what it measured.
"""
from __future__ import annotations

import argparse
import dataclasses
import platform
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from benchmarks.common import cuda_seconds
from linear_moe.components.files import atomic_write_json
from linear_moe.kernels.lasp import correction
from linear_moe.kernels.lasp.correction import CorrectionTiles
from linear_moe.kernels.resources import resource_usage
from linear_moe.kernels.testing import rel_error

IEEE = dict(fwd_bt=16, fwd_bv=64, fwd_bk=32, dq_bt=16, dq_bk=32, dq_bv=32, ds_bt=32, ds_bk=64, ds_bv=64,
            fwd_precision="ieee", bwd_precision="ieee")
TF32X3_T64 = dict(fwd_bt=64, fwd_bv=64, fwd_bk=64, dq_bt=64, dq_bk=64, dq_bv=64, ds_bt=64, ds_bk=64, ds_bv=64,
                  fwd_precision="tf32x3", bwd_precision="tf32x3")
#: name -> tiles; the production default is measured first as "default". Measured on an H200 (Triton 3.6,
#: benchmarks/results/gpu/h200_run4): the default's forward is ieee_v128's, its backward tf32x3_t64_k128's.
#: Run 4's kernels unrolled their K and V steps; run 5 re-measured those two and the default with loops.
CANDIDATES = {
    "ieee_t16": CorrectionTiles(**IEEE),
    "ieee_t32": CorrectionTiles(**{**IEEE, "fwd_bt": 32, "dq_bt": 32}),
    "ieee_t64": CorrectionTiles(**{**IEEE, "fwd_bt": 64, "dq_bt": 64, "ds_bt": 64}),
    "ieee_v128": CorrectionTiles(**{**IEEE, "fwd_bv": 128, "dq_bk": 64}),
    "ieee_ds_t16": CorrectionTiles(**{**IEEE, "ds_bt": 16}),
    "ieee_t32_w8": CorrectionTiles(**{**IEEE, "fwd_bt": 32, "dq_bt": 32, "num_warps": 8}),
    "ieee_t32_w2": CorrectionTiles(**{**IEEE, "fwd_bt": 32, "dq_bt": 32, "num_warps": 2}),
    "tf32x3_t32": CorrectionTiles(**{**TF32X3_T64, "fwd_bt": 32, "dq_bt": 32, "ds_bt": 32}),
    "tf32x3_t64": CorrectionTiles(**TF32X3_T64),
    "tf32x3_t64_k128": CorrectionTiles(**{**TF32X3_T64, "fwd_bk": 128, "dq_bv": 128, "ds_bt": 32}),
    "tf32x3_t128": CorrectionTiles(**{**TF32X3_T64, "fwd_bt": 128, "fwd_bk": 32, "dq_bt": 128, "dq_bv": 32,
                                      "ds_bk": 128, "num_warps": 8}),
    # single TF32 products: about 1e-3 relative, for comparison (not fp32-accurate)
    "tf32_t64": CorrectionTiles(**{**TF32X3_T64, "fwd_precision": "tf32", "bwd_precision": "tf32"}),
}


def compile_resources(tiles: CorrectionTiles, K: int, V: int) -> dict:
    """Each kernel's registers and stack frame on sm_90a with these tiles (ahead of time)."""
    constexprs = correction.launch_constexprs(K, V, has_g=True, tiles=tiles)
    out = {}
    for name, kernel in correction.KERNELS.items():
        try:
            usage = resource_usage(kernel, correction.ARG_TYPES[name], constexprs[name], num_warps=tiles.num_warps)
            out[name] = {"registers": usage["REG"], "stack_bytes": usage["STACK"]}
        except Exception as err:  # a candidate that does not compile is a result, not a crash
            out[name] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
    return out


def _errors(tiles: CorrectionTiles, o, q, gcum, s, d_out, scale) -> dict[str, float]:
    """Relative RMS errors of the kernels' output and gradients against PyTorch's."""
    c = correction
    refs = (c.naive_state_correction(o, q, gcum, s, scale), *c._torch_backward(d_out, q, gcum, s, scale))
    gots = (c._triton_forward(o, q, gcum, s, scale, tiles), *c._triton_backward(d_out, q, gcum, s, scale, tiles))
    return {name: rel_error(r.float(), g.float()) for name, r, g in zip(("out", "d_q", "d_gcum", "d_s"), refs, gots)}


def time_tiles(tiles: CorrectionTiles, args: argparse.Namespace, T: int) -> dict:
    """Forward and backward seconds of the Triton kernels and of PyTorch, and the kernels' errors with bf16
    activations (the timed case) and with fp32 ones (the CUDA test's 1e-5 criterion)."""
    B, H, D = args.batch, args.heads, args.head_dim
    gen = torch.Generator(device="cuda").manual_seed(0)
    rnd = lambda *size: torch.randn(*size, device="cuda", generator=gen)  # noqa: E731
    q32, o32, d_out32 = (rnd(B, T, H, D) for _ in range(3))
    q, o, d_out = q32.bfloat16(), o32.bfloat16(), d_out32.bfloat16()
    gcum = F.logsigmoid(rnd(B, T, H, D)).cumsum(1) / T ** 0.5  # a decay that keeps exp(gcum) in fp32's range
    s = rnd(B, H, D, D)
    scale = D ** -0.5
    row = {"seq_len": T, "rel_error_bf16": _errors(tiles, o, q, gcum, s, d_out, scale),
           "rel_error_fp32": _errors(tiles, o32, q32, gcum, s, d_out32, scale),
           **{key: cuda_seconds(fn, args.cuda_rep_ms) for key, fn in (
               ("triton_fwd_s", lambda: correction._triton_forward(o, q, gcum, s, scale, tiles)),
               ("triton_bwd_s", lambda: correction._triton_backward(d_out, q, gcum, s, scale, tiles)),
               ("torch_fwd_s", lambda: correction.naive_state_correction(o, q, gcum, s, scale)),
               ("torch_bwd_s", lambda: correction._torch_backward(d_out, q, gcum, s, scale)))}}
    row["fwd_over_torch"] = row["triton_fwd_s"] / row["torch_fwd_s"]
    row["bwd_over_torch"] = row["triton_bwd_s"] / row["torch_bwd_s"]
    return row


def run(args: argparse.Namespace) -> dict:
    cuda = args.device == "cuda"
    candidates = {name: tiles for name, tiles in {"default": correction.TILES, **CANDIDATES}.items()
                  if not args.candidates or name in args.candidates}
    result = {
        "compares": "Triton state-correction kernels per tile candidate vs PyTorch (fp32 cuBLAS), forward and "
                    "backward apart; relative RMS errors against PyTorch",
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "triton": triton.__version__, "torch": torch.__version__, "python": platform.python_version(),
        "device_name": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "candidates": {},
    }
    for name, tiles in candidates.items():
        entry = {"tiles": dataclasses.asdict(tiles),
                 "resources_sm90": compile_resources(tiles, args.head_dim, args.head_dim)}
        if cuda:
            entry["timings"] = []
            for T in args.seq_lens:
                try:
                    entry["timings"].append(time_tiles(tiles, args, T))
                except Exception as err:
                    entry["timings"].append({"seq_len": T, "error": f"{type(err).__name__}: {str(err)[:300]}"})
        result["candidates"][name] = entry
        atomic_write_json(args.out, result)
    return result


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: time and check each candidate too; cpu: compile for sm_90a only")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128, help="K = V")
    p.add_argument("--seq-lens", type=lambda s: [int(x) for x in s.split(",")], default=[4096, 16384],
                   help="comma-separated lengths, timed on CUDA")
    p.add_argument("--candidates", type=lambda s: s.split(","), default=None,
                   help=f"comma-separated subset of: default,{','.join(CANDIDATES)} (default: all)")
    p.add_argument("--cuda-rep-ms", type=int, default=40, help="do_bench's measuring window per figure")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/lasp_tiles.json"))
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    unknown = set(args.candidates or ()) - {"default", *CANDIDATES}
    if unknown:
        p.error(f"--candidates: unknown {sorted(unknown)}; known: default,{','.join(CANDIDATES)}")
    return args


def main(argv=None) -> dict:
    res = run(parse_args(argv))
    for name, entry in res["candidates"].items():
        spills = {k: v.get("stack_bytes", v.get("error", "")[:40]) for k, v in entry["resources_sm90"].items()}
        line = f"{name:>18} stack {spills}"
        for row in entry.get("timings", []):
            if "error" in row:
                line += f" | T={row['seq_len']} {row['error'][:80]}"
            else:
                worst = {kind: max(row[f"rel_error_{kind}"].values()) for kind in ("bf16", "fp32")}
                line += (f" | T={row['seq_len']} fwd {row['fwd_over_torch']:.2f}x bwd {row['bwd_over_torch']:.2f}x "
                         f"err bf16 {worst['bf16']:.1e} fp32 {worst['fp32']:.1e}")
        print(line)
    return res


if __name__ == "__main__":
    main()
