#!/usr/bin/env bash
# CI smoke bench with the latency regression gate: tiny 4- vs 2-layer models (hidden 64), made
# on the fly, PyTorch and ONNX Runtime, two small cells, ratios checked against the committed
# baseline. Refresh the baseline: `make bench-baseline` (see docs/bench.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/smoke}
BASELINE=${BASELINE:-theseus_deploy/bench/baselines/ci-smoke.json}
TOL=${TOL:-0.2}
mkdir -p "$OUT"
"$PY" tests/tiny.py "$OUT/pred" --layers 4 --hidden 64 >/dev/null
"$PY" tests/tiny.py "$OUT/succ" --layers 2 --hidden 64 --seed 1 >/dev/null
ARGS=(bench --model "$OUT/pred" --model "$OUT/succ" --backend torch --backend onnx --batch-sizes 1,8 --seq-lens 64
      --threads 1 --warmup 5 --iterations 40 --rounds 8 --min-seconds 2 --output "$OUT/bench" --overwrite)
if [ "${1:-}" = "--update" ]; then
  "$PY" -m theseus_deploy "${ARGS[@]}" --update-baseline "$BASELINE"
else
  "$PY" -m theseus_deploy "${ARGS[@]}" --check "$BASELINE" --tolerance "$TOL"
fi
