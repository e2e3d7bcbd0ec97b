#!/usr/bin/env bash
# GPU check: on a machine with a CUDA GPU, in under 8 minutes, run the GPU tests and the GPU bench
# (every PyTorch backend, eager and compiled, BERT-base size 12 vs 6 layers random init, s128,
# b1/b8/b32; real traffic on SST-2 dev) and write results + logs into ONE flat folder:
#
#   scripts/gpu_check.sh OUT [BERT_CONFIG_DIR] [GLUE_DIR]     (or: make gpu-check GPU_OUT=... )
#
#   BERT_CONFIG_DIR  a BERT-base config folder (config.json + tokenizer); default $THESEUS_BERT_CONFIG,
#                    else ../shared/models/bert-base-uncased
#   GLUE_DIR         a glue_data folder with SST-2/dev.tsv; default $THESEUS_DATA_DIR, else
#                    ../shared/data/glue; without one the traffic step is skipped
#   PY               the Python with torch (CUDA build) and the project's dependencies; default python3
#                    (the project need not be installed: the repository goes on PYTHONPATH)
#
# OUT gets at most 8 files, no sub-folders:
#   gpu-check.log    every step's output, with timestamps (environment first)
#   gpu-tests.log    pytest -m "gpu or trt"
#   report.md        step status, then each bench step's report
#   bench-eager.json, bench-compiled-fp16.json, bench-compiled-bf16.json, bench-traffic.json
#                    each bench step's results.json (plots: python -m theseus_deploy.bench.report FILE DIR)
#   bench-ort.json   only where onnxruntime-gpu's CUDA execution provider loads
# GPU_CHECK_BATCHES overrides the batch sizes (default 1,8,32). GPU_CHECK_DEVICE=cpu runs the same steps on the CPU (a plumbing check of this script only: the
# CUDA-only backends then fail their steps, which shows that steps are independent).
# Each step has its own time box (T_* variables below) and runs whatever happened before it; the
# exit status is 0 when every step that ran passed, 1 otherwise, 2 on bad arguments or no GPU.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
REPO=$PWD
PY=${PY:-python3}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false

err() { echo "error: $*" >&2; exit 2; }
[ $# -ge 1 ] && [ -n "$1" ] || err "usage: scripts/gpu_check.sh OUT [BERT_CONFIG_DIR] [GLUE_DIR]"
OUT=$1
BERT=${2:-${THESEUS_BERT_CONFIG:-../shared/models/bert-base-uncased}}
GLUE=${3:-${THESEUS_DATA_DIR:-../shared/data/glue}}
# Time boxes (seconds); the defaults sum to 460 s (+ ~15 s of checks) when onnxruntime-gpu is absent.
# Compiling BERT-base (one graph per model and bucket) dominates the compiled steps: if one times
# out, rerun with a larger box, e.g. T_FP16=200.
T_TESTS=${T_TESTS:-70} T_EAGER=${T_EAGER:-50} T_FP16=${T_FP16:-120} T_BF16=${T_BF16:-110}
T_TRAFFIC=${T_TRAFFIC:-110} T_ORT=${T_ORT:-60}

command -v "$PY" >/dev/null 2>&1 || err "PY=$PY: no such Python"
[ -f "$BERT/config.json" ] || err "BERT-base config folder not found: '$BERT' has no config.json (pass it as the 2nd argument or THESEUS_BERT_CONFIG)"
DEVICE=${GPU_CHECK_DEVICE:-cuda}
# Before anything is written: a CUDA GPU must be visible to this torch.
if [ "$DEVICE" = cuda ] && ! why=$(timeout 60 "$PY" - 2>&1 <<'EOF'
import importlib.util, sys
try:
    import torch
except ImportError as e:
    sys.exit(f"torch is not importable ({e})")
missing = [m for m in ("transformers", "click", "tqdm", "numpy", "onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing Python packages: {', '.join(missing)} (pip install them; see docs/bench.md, GPU)")
if not torch.cuda.is_available():
    sys.exit(f"no CUDA GPU is visible to PyTorch (torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'}); "
             "gpu_check needs a CUDA GPU")
EOF
); then
  err "$(echo "$why" | tail -n 1)"
fi
if [ -e "$OUT" ] && [ -n "$(ls -A "$OUT" 2>/dev/null)" ]; then err "output folder $OUT is not empty"; fi
mkdir -p "$OUT" || err "cannot create $OUT"
OUT=$(cd "$OUT" && pwd)
LOG=$OUT/gpu-check.log
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
trap 'rm -rf "$SCRATCH"' EXIT
START=$(date +%s)
STATUS=()

say() { echo "[$(date -u +%H:%M:%S) +$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }

# step NAME SECONDS CMD...: time-boxed, output to the log; a failure is recorded, never fatal.
step() {
  local name=$1 limit=$2; shift 2
  say "step $name: start (time box ${limit}s)"
  local t0=$(date +%s)
  timeout -k 10 "$limit" "$@" >"$SCRATCH/step.log" 2>&1
  local rc=$?
  cat "$SCRATCH/step.log" >>"$LOG"
  local dt=$(( $(date +%s) - t0 ))
  local what="ok"
  { [ $rc -eq 124 ] || [ $rc -eq 137 ]; } && what="TIMED OUT"
  if [ $rc -ne 0 ] && [ "$what" = ok ]; then
    what="FAILED (exit $rc): $(grep -E '^error:' "$SCRATCH/step.log" | tail -n 1 | tr '|' '/')"
  fi
  say "step $name: $what in ${dt}s"
  STATUS+=("| $name | $what | ${dt}s of ${limit}s |")
  return $rc
}

# bench NAME SECONDS ARGS...: one `bench` run; keeps its results.json as OUT/bench-NAME.json and
# appends its report.md to OUT/report.md's body.
BODY=$SCRATCH/body.md
bench() {
  local name=$1 limit=$2; shift 2
  step "bench-$name" "$limit" "$PY" -m theseus_deploy bench "$@" --output "$SCRATCH/$name"
  local rc=$?
  if [ -f "$SCRATCH/$name/results.json" ]; then
    cp "$SCRATCH/$name/results.json" "$OUT/bench-$name.json" && chmod 644 "$OUT/bench-$name.json"
    { echo; echo "# Step bench-$name"; echo; sed '1s/^# /## /' "$SCRATCH/$name/report.md"; } >>"$BODY"
  fi
  return $rc
}

say "gpu_check: OUT=$OUT BERT=$BERT GLUE=$GLUE PY=$PY"
{
  echo "## environment"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || true
  "$PY" - <<'EOF' 2>&1
import importlib.metadata as md, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "cuda", torch.version.cuda)
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(0), "| capability", torch.cuda.get_device_capability(0))
for p in ("transformers", "accelerate", "onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu", "tensorrt", "triton"):
    try:
        print(f"  {p} {md.version(p)}")
    except md.PackageNotFoundError:
        print(f"  {p} (not installed)")
EOF
  lscpu 2>/dev/null | grep 'Model name' || true
} >>"$LOG"

# 1. GPU tests
say "step gpu-tests: start (time box ${T_TESTS}s)"
t0=$(date +%s)
timeout -k 10 "$T_TESTS" "$PY" -m pytest -q -m "gpu or trt" -p no:cacheprovider tests >"$OUT/gpu-tests.log" 2>&1
rc=$?
what=ok; { [ $rc -eq 124 ] || [ $rc -eq 137 ]; } && what="TIMED OUT"
# pytest exit 5: nothing selected; 0: passed
[ $rc -ne 0 ] && [ "$what" = ok ] && what="FAILED (exit $rc)"
say "step gpu-tests: $what in $(( $(date +%s) - t0 ))s: $(tail -n 1 "$OUT/gpu-tests.log")"
STATUS+=("| gpu-tests | $what | $(( $(date +%s) - t0 ))s of ${T_TESTS}s |")

# 2. the bench: BERT-base size, 12 (predecessor) vs 6 (successor) layers, random init, s128
COMMON=(--model "$BERT" --model "$BERT" --layers 12 --layers 6 --device "$DEVICE" --batch-sizes "${GPU_CHECK_BATCHES:-1,8,32}" --seq-lens 128
        --warmup 3 --iterations 30 --min-seconds 0.3 --rounds 3)
EAGER=(--backend torch --backend torch-fp16 --backend torch-bf16)
[ "$DEVICE" = cpu ] && EAGER=(--backend torch --backend torch-bf16)  # (plumbing check: fp16 is CUDA-only)
bench eager "$T_EAGER" "${COMMON[@]}" "${EAGER[@]}"
bench compiled-fp16 "$T_FP16" "${COMMON[@]}" --backend torch --backend torch-compile-fp16
bench compiled-bf16 "$T_BF16" "${COMMON[@]}" --backend torch --backend torch-compile-bf16

# 3. real traffic: SST-2 dev (872 sentences), batch 32, fixed vs dynamic padding, 3 rounds after
#    an untimed pass over every batch shape; the compiled runner pads widths to multiples of 64.
if [ -f "$GLUE/SST-2/dev.tsv" ]; then
  bench traffic "$T_TRAFFIC" --model "$BERT" --model "$BERT" --layers 12 --layers 6 --device "$DEVICE" \
    --backend torch --backend torch-fp16 --backend torch-compile-fp16 --batch-sizes 32 --seq-lens 128 \
    --warmup 3 --iterations 10 --min-seconds 0 --rounds 1 --task sst2 --data-dir "$GLUE" \
    --traffic-batch-size 32 --traffic-max-length 128 --traffic-rounds 3 --seq-bucket 64
else
  say "step bench-traffic: skipped (no $GLUE/SST-2/dev.tsv; pass a glue_data folder as the 3rd argument)"
  STATUS+=("| bench-traffic | skipped (no SST-2) | - |")
fi

# 4. ONNX Runtime on CUDA, only where onnxruntime-gpu's CUDA execution provider is there
if "$PY" -c "import onnxruntime as o, sys; sys.exit(0 if 'CUDAExecutionProvider' in o.get_available_providers() else 1)" 2>/dev/null; then
  bench ort "$T_ORT" "${COMMON[@]}" --backend torch --backend onnx-fp16
else
  say "step bench-ort: skipped (no CUDAExecutionProvider in this onnxruntime)"
  STATUS+=("| bench-ort | skipped (onnxruntime without CUDA EP) | - |")
fi

{
  echo "# GPU check $(date -u +%Y-%m-%dT%H:%M:%SZ), $(( $(date +%s) - START ))s"
  echo
  echo "| step | result | time |"; echo "|---|---|---|"
  printf '%s\n' "${STATUS[@]}"
  [ -f "$BODY" ] && cat "$BODY"
} >"$OUT/report.md"
say "done in $(( $(date +%s) - START ))s; results in $OUT (report.md, gpu-check.log)"
if printf '%s\n' "${STATUS[@]}" | grep -qE 'FAILED|TIMED OUT'; then exit 1; fi
exit 0
