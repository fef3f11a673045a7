#!/usr/bin/env bash
# The GPU benchmark suite in one script, for an H100/H200 machine with no network (Python 3.12,
# torch + triton preinstalled, fla and megatron-core carried as wheels in .whl/). Run it from the
# repository root; results land in $OUT (default benchmarks/results/gpu):
#
#     bash benchmarks/gpu_suite.sh                          # all steps: about 9.5 minutes at most
#     SUITE_STEPS="gpu_tests kernels" bash benchmarks/gpu_suite.sh    # a subset
#
# With the device tool (10-minute calls, the machine released after 30 s idle): two back-to-back calls,
# SUITE_STEPS="gpu_tests kernels" (<= 5.5 min) then SUITE_STEPS="sp train" (<= 4 min), so the second
# one finds the first one's Triton cache.
#
#   gpu_tests.log                    pytest tests/gpu (megatron optimizer, bf16, recompute, resume, grouped GEMM)
#   kernels_gpu.json / kernels.log   benchmarks.bench_kernels: forward+backward, bf16, B=4 H=8 D=128 (the
#                                    A0.3B-2B head shape): our dispatch vs fla called directly vs SDPA
#   sp_gpu.json      / sp.log        benchmarks.bench_sp: SP=1 path vs plain fla, Triton correction vs PyTorch
#   train_gpu.json   / train.log     benchmarks.bench_train --suite gpu-lengths: tokens/s over 2k..16k
#   suite.log                        environment, exit codes (124 = timed out), summary
#
# Device tool: carry [".whl"]. Each step has its own timeout and one failure does not stop the others
# (set +e); every benchmark rewrites its JSON after each case, so a step cut short keeps its figures.
# Measured on an H200 (2026-11-26): with a cold Triton cache every step of the first version ran out of
# its (then halved) time in fla's first compilations and autotuning (fla 0.6.0, Triton 3.6). The
# timeouts below assume a cold cache; TRITON_CACHE_AUTOTUNING=1 lets later steps reuse earlier tuning,
# and LINEAR_MOE_AUTOTUNE_CONFIGS=1 (the default here) skips the tuning.
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
set +e
OUT=${OUT:-$PWD/benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# keep autotuning results with the compiled kernels (Triton >= 3.4 reads it), so a step reuses the last one's
export TRITON_CACHE_AUTOTUNING=1
# one config per autotuned kernel (linear_moe.kernels.autotune): one compilation each instead of tens, so a cold
# cache fits a 15-minute session; every JSON records the bound ("autotune_configs"). Set it empty for full tuning.
export LINEAR_MOE_AUTOTUNE_CONFIGS=${LINEAR_MOE_AUTOTUNE_CONFIGS-1}
LOG="$OUT/suite.log"
log() { echo "$*" | tee -a "$LOG"; }

# The project imports as linear_moe.<folder> (setup.py's package-dir mapping): an editable install
# where setuptools allows it, else a namespace package of symlinks under /tmp/site.
importable() { python3 -c "import linear_moe.model, linear_moe.kernels, linear_moe.components" 2>/dev/null; }
if ! importable; then
  python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >>"$LOG" 2>&1
fi
if ! importable; then
  log "editable install unavailable: linking the folders under /tmp/site/linear_moe"
  mkdir -p /tmp/site/linear_moe
  for folder in model kernels components pipelines; do ln -sfn "$PWD/$folder" "/tmp/site/linear_moe/$folder"; done
fi
importable || log "ERROR: linear_moe is not importable; the steps below will fail"

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 - <<'EOF'
import importlib.metadata as md, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "device", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
for name in ("triton", "fla-core", "flash-linear-attention", "megatron-core", "transformers", "einops"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "MISSING")
for mod in ("grouped_gemm", "transformer_engine", "apex", "flash_attn"):
    try:
        __import__(mod); print(mod, "present")
    except Exception:
        print(mod, "absent")
EOF
} 2>&1 | tee -a "$LOG"

# step NAME TIMEOUT_S COMMAND...: run with a timeout, log to $OUT/NAME.log, record the exit code
EXIT_CODES=""
step() {
  local name=$1 limit=$2; shift 2
  log "== $name (timeout ${limit}s): $*"
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  EXIT_CODES+="$name=$rc "
  log "== $name: exit $rc after $((SECONDS - start)) s"
}

SUITE_STEPS=${SUITE_STEPS:-gpu_tests kernels sp train}
for name in $SUITE_STEPS; do
  case $name in
    gpu_tests) step gpu_tests 180 python3 -m pytest -q -x --tb=short --timeout=150 -p no:cacheprovider \
                 -o addopts=-ra tests/gpu ;;
    kernels) step kernels 150 python3 -m benchmarks.bench_kernels --device cuda --mode train --ops gla,delta_rule \
               --roles fla,fla_direct,sdpa,chunk --batch 4 --heads 8 --head-dim 128 --seq-lens 2048,4096,8192,16384 \
               --repeats 3 --max-seconds 20 --out "$OUT/kernels_gpu.json" ;;
    sp) step sp 80 python3 -m benchmarks.bench_sp --device cuda --skip-comm --batch 4 --heads 8 --head-dim 128 \
          --seq-lens 4096,16384 --out "$OUT/sp_gpu.json" ;;
    train) step train 150 python3 -m benchmarks.bench_train --device cuda --suite gpu-lengths --layers 4 \
             --lengths 2048,4096,8192,16384 --tokens-per-step 32768 --mixers gla,softmax,gated_deltanet \
             --warmup 2 --steps 3 --budget-s 120 --out "$OUT/train_gpu.json" ;;
    *) log "== $name: unknown step (known: gpu_tests kernels sp train)" ;;
  esac
done

[ -f "$OUT/gpu_tests.log" ] && tail -n 25 "$OUT/gpu_tests.log" | tee -a "$LOG"
log "== summary (exit codes, 124 = timed out: $EXIT_CODES)"
python3 - "$OUT" <<'EOF' 2>&1 | tee -a "$LOG"
import json, sys
from pathlib import Path

out = Path(sys.argv[1])

def load(name):
    path = out / name
    if not path.is_file():
        print(f"{name}: not written")
        return None
    return json.loads(path.read_text())

kernels = load("kernels_gpu.json")
if kernels:
    for key, values in kernels.get("summary", {}).items():
        print("kernels", key, {k: (round(v, 3) if isinstance(v, float) else v) for k, v in values.items()})
sp = load("sp_gpu.json")
if sp:
    for section in ("sp1_overhead", "correction"):
        rows = sp.get(section, "not reached")
        for row in rows if isinstance(rows, list) else [rows]:
            print("sp", section, {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}
                  if isinstance(row, dict) else row)
train = load("train_gpu.json")
if train:
    print("train on", train["device_name"], "|", train["compares"])
    for case in train["cases"]:
        if case["status"] == "ok":
            print(f"  {case['name']:>22}  {case['tokens_per_s']:>10.0f} tok/s  peak {case['peak_memory_mb']:>8.0f} MiB"
                  f"  step_fn {case['step_fn']}")
        else:
            print(f"  {case['name']:>22}  {case['status']}: {case.get('error', case.get('reason', ''))[:160]}")
    for mixer, s in train.get("summary", {}).items():
        if "max_over_min" not in s:
            print(f"  {mixer}: no length measured {s.get('lengths_not_ok')}")
            continue
        print(f"  {mixer}: max/min over lengths {s['max_over_min']:.2f}, drop shortest->longest "
              f"{s['drop_shortest_to_longest']:.1%}", {k: round(v, 2) for k, v in s.get("over_softmax", {}).items()},
              s.get("lengths_not_ok", ""))
EOF
exit 0
