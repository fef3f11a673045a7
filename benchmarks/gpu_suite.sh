#!/usr/bin/env bash
# The GPU benchmark suite in one script, for an H100/H200 machine with no network (Python 3.12,
# torch + triton preinstalled, fla and megatron-core carried as wheels in .whl/). Run it from the
# repository root; results land in $OUT (default benchmarks/results/gpu):
#
#     bash benchmarks/gpu_suite.sh                          # all steps, at most SUITE_DEADLINE_S (570 s)
#     SUITE_STEPS="warmup gpu_tests kernels" bash benchmarks/gpu_suite.sh    # a subset
#
# Steps, in order:
#   warmup      starts, in the background, one short run per Triton code path the timed steps use (fla's
#               GLA, delta-rule and KDA ops, our LASP-2 kernels, the GLA and Gated DeltaNet models at the
#               A0.3B-2B head shape), so the cold compilations run side by side on the machine's cores
#               instead of one after another inside the timed steps; logs in /tmp/warm, tails in suite.log
#   gpu_tests   the CUDA-only tests, 4 pytest workers: tests/gpu (megatron optimizer, bf16, recompute, resume,
#               grouped GEMM), compiled fla ops and our dispatch against our chunked path, the compiled LASP-2
#               kernels against their PyTorch references; correctness only, so it runs while the warm-up compiles
#   kernels, sp, train   the timed benchmarks; each first waits for the warm-up to end, so no other
#               process shares the GPU while they time
#
#   gpu_tests.log                    the CUDA-only tests, with each compiled-fla case's relative errors
#   kernels_gpu.json / kernels.log   benchmarks.bench_kernels: forward+backward, bf16, B=4 H=8 D=128 (the
#                                    A0.3B-2B head shape): our dispatch vs fla called directly vs SDPA
#   lasp_tiles_gpu.json / tiles.log  benchmarks.bench_lasp_tiles (step "tiles", not in the default list; TILES_ARGS): the
#                                    state-correction kernels' tile candidates, forward and backward vs PyTorch
#   sp_gpu.json      / sp.log        benchmarks.bench_sp: SP=1 path vs plain fla, Triton correction and
#                                    composition (W = 4, 8) vs PyTorch
#   train_gpu.json   / train.log     benchmarks.bench_train --suite gpu-lengths: tokens/s over 2k..16k
#                                    (TRAIN_ARGS=--grouped-gemm: grouped-GEMM experts; TRAIN_STEPS timed steps)
#   suite.log                        environment, exit codes (124 = timed out), warm-up tails, summary
#
# Device tool (10-minute calls, 15 minutes of device time, the machine released after 30 s idle): one
# call, carry [".whl"], timeout_s 600. Each step has its own timeout, cut to what is left of
# SUITE_DEADLINE_S, and one failure does not stop the others (set +e); every benchmark rewrites its JSON
# after each case, so a step cut short keeps its figures.
# Measured on an H200 (2026-11-26): with a cold Triton cache every step of the first version ran out of
# its time in fla's first compilations and autotuning (fla 0.6.0, Triton 3.6), hence the warm-up. With it,
# on an H200: the warm-up's runs took 35 to 52 s side by side, the whole suite 262 s
# (benchmarks/results/gpu/README.md).
# TRITON_CACHE_AUTOTUNING=1 lets later steps reuse earlier tuning, and LINEAR_MOE_AUTOTUNE_CONFIGS=1 (the
# default here) skips the tuning.
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

# step NAME TIMEOUT_S COMMAND...: run with a timeout (cut to what is left before the deadline), log to
# $OUT/NAME.log, record the exit code
DEADLINE=$((SECONDS + ${SUITE_DEADLINE_S:-570}))
EXIT_CODES=""
step() {
  local name=$1 limit=$2; shift 2
  local left=$((DEADLINE - SECONDS - 20))  # 20 s kept for the summary
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 15 ]; then log "== $name: skipped, the suite deadline is near"; EXIT_CODES+="$name=skipped "; return; fi
  log "== $name (timeout ${limit}s): $*"
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  EXIT_CODES+="$name=$rc "
  log "== $name: exit $rc after $((SECONDS - start)) s"
}

# The warm-up: short runs of the timed steps' code paths at their shapes, in the background.
WARM=/tmp/warm
WARM_PIDS=()
warm() {  # warm NAME COMMAND...
  local name=$1; shift
  ( start=$SECONDS; timeout --kill-after=10 "${WARMUP_LIMIT_S:-220}" "$@" >"$WARM/$name.log" 2>&1
    echo "warm $name: exit $? after $((SECONDS - start)) s" >>"$WARM/exits" ) &
  WARM_PIDS+=($!)
}
warmup_start() {
  mkdir -p "$WARM"
  log "== warmup: ${WARMUP_LIMIT_S:-220} s at most, in the background"
  local shape=(--device cuda --mode train --batch 4 --heads 8 --head-dim 128 --seq-lens 2048 --repeats 1 --cuda-rep-ms 5)
  warm kernels_gla python3 -m benchmarks.bench_kernels "${shape[@]}" --ops gla --roles fla,fla_direct --out "$WARM/k_gla.json"
  warm kernels_delta python3 -m benchmarks.bench_kernels "${shape[@]}" --ops delta_rule --roles fla,fla_direct \
    --out "$WARM/k_delta.json"
  warm sp python3 -m benchmarks.bench_sp --device cuda --skip-comm --batch 4 --heads 8 --head-dim 128 --seq-lens 4096 \
    --cuda-rep-ms 5 --out "$WARM/sp.json"
  for mixer in gla gated_deltanet; do
    warm "train_$mixer" python3 -m benchmarks.bench_train --device cuda --suite gpu-lengths --layers 1 --lengths 2048 \
      --tokens-per-step 4096 --mixers "$mixer" --warmup 1 --steps 1 $TRAIN_ARGS --out "$WARM/train_$mixer.json"
  done
}
warmup_wait() {  # before a timed step: no other process on the GPU
  [ ${#WARM_PIDS[@]} -eq 0 ] && return
  local start=$SECONDS
  wait "${WARM_PIDS[@]}"
  WARM_PIDS=()
  log "== warmup done ($((SECONDS - start)) s waited)"
  cat "$WARM/exits" | tee -a "$LOG"
  for f in "$WARM"/*.log; do echo "-- tail of $f" >>"$LOG"; tail -n 4 "$f" >>"$LOG"; done
}

SUITE_STEPS=${SUITE_STEPS:-warmup gpu_tests kernels sp train}
for name in $SUITE_STEPS; do
  case $name in
    warmup) warmup_start ;;
    gpu_tests) step gpu_tests 220 python3 -m pytest -q --tb=short --timeout=200 -p no:cacheprovider -o addopts=-rA \
                 -n 4 -m "not slow" -k "cuda or gpu" tests/gpu tests/kernels/test_fla_triton_interpreter.py \
                 tests/kernels/test_lasp_correction.py tests/kernels/test_lasp_compose.py ;;
    kernels) warmup_wait
             step kernels 120 python3 -m benchmarks.bench_kernels --device cuda --mode train --ops gla,delta_rule \
               --roles fla,fla_direct,sdpa --batch 4 --heads 8 --head-dim 128 --seq-lens 2048,4096,8192,16384 \
               --repeats 3 --paired-repeats ${PAIRED_REPEATS:-7} --max-seconds 20 --out "$OUT/kernels_gpu.json" ;;
    tiles) warmup_wait
           step tiles 250 python3 -m benchmarks.bench_lasp_tiles --device cuda $TILES_ARGS --out "$OUT/lasp_tiles_gpu.json" ;;
    sp) warmup_wait
        step sp 90 python3 -m benchmarks.bench_sp --device cuda --skip-comm --batch 4 --heads 8 --head-dim 128 \
          --seq-lens 4096,16384 --world 4,8 --out "$OUT/sp_gpu.json" ;;
    train) warmup_wait
           step train 170 python3 -m benchmarks.bench_train --device cuda --suite gpu-lengths --layers 4 \
             --lengths 2048,4096,8192,16384 --tokens-per-step 32768 --mixers gla,softmax,gated_deltanet \
             --warmup 2 --steps ${TRAIN_STEPS:-3} --budget-s 140 $TRAIN_ARGS --out "$OUT/train_gpu.json" ;;
    *) log "== $name: unknown step (known: warmup gpu_tests kernels tiles sp train)" ;;
  esac
done
warmup_wait

[ -f "$OUT/gpu_tests.log" ] && grep -E "passed|failed|FAILED|ERROR|SKIPPED" "$OUT/gpu_tests.log" | tail -n 40 | tee -a "$LOG"
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
    for section in ("sp1_overhead", "correction", "compose"):
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
