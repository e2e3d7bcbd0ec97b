#!/usr/bin/env bash
# docs/sweep.md end to end: sweep a fine-tuned MiniLM-L6 SST-2 predecessor over depths 6,4,3,2,1 and
# backends torch / torch-bf16 / onnx-int8, timed at b1 s128 (5 ms budget, then 10 ms: a re-decision
# from the same DIR, nothing retrained or re-timed), then on real traffic (only the timing runs).
#   PRED=runs/demo/predecessor DIR=runs/sweep-minilm-sst2 STEPS=300 bash scripts/sweep_minilm.sh
# STEPS="" uses the sweep's default per-depth budget (1 epoch of SST-2 at seq 64 = 2,105 steps).
set -uo pipefail
cd "$(dirname "$0")/.."
TD=${TD:-.venv/bin/theseus-deploy}  # e.g. TD="env PYTHONPATH=$PWD python -m theseus_deploy"
PRED=${PRED:-runs/demo/predecessor}
DIR=${DIR:-runs/sweep-minilm-sst2}
STEPS=${STEPS-300}
BACKENDS=${BACKENDS:-torch,torch-bf16,onnx-int8}
THREADS=${THREADS:-1}   # on a shared 2-core machine 2 threads ran 5-14x slower than 1 (docs/sweep.md)
BUDGET=(${STEPS:+--max-steps "$STEPS"} --save-steps 100)
DEPTHS=${DEPTHS:-6,4,3,2,1}
COMMON=(--model "$PRED" --task sst2 --output "$DIR" --depths "$DEPTHS" --backends "$BACKENDS" --threads "$THREADS"
        "${BUDGET[@]}")
lscpu | grep -E 'Model name'; grep -o -E -w 'avx512_bf16|avx512_vnni|amx_[a-z0-9]+' /proc/cpuinfo | sort -u | tr '\n' ' '; echo
set -x
# exit 3 (nothing within the budget) is an answer, not a failure: carry on with the next decision
date; $TD sweep "${COMMON[@]}" --latency-shape 1x128 --latency-budget 5ms;  echo "exit $?"
cp "$DIR/report.md" "$DIR/report-1x128-5ms.md"; cp "$DIR/pareto.png" "$DIR/pareto-1x128-5ms.png"
date; $TD sweep "${COMMON[@]}" --latency-shape 1x128 --latency-budget 10ms; echo "exit $?"
cp "$DIR/report.md" "$DIR/report-1x128-10ms.md"; cp "$DIR/pareto.png" "$DIR/pareto-1x128-10ms.png"
date; $TD sweep "${COMMON[@]}" --traffic --latency-budget 5ms;  echo "exit $?"
cp "$DIR/report.md" "$DIR/report-traffic-5ms.md"; cp "$DIR/pareto.png" "$DIR/pareto-traffic-5ms.png"
date; $TD sweep "${COMMON[@]}" --traffic --latency-budget 10ms; echo "exit $?"
cp "$DIR/report.md" "$DIR/report-traffic-10ms.md"; cp "$DIR/pareto.png" "$DIR/pareto-traffic-10ms.png"
# the same points under looser drop limits: again nothing retrained or re-timed
date; $TD sweep "${COMMON[@]}" --latency-shape 1x128 --latency-budget 10ms --max-task-drop 0.05; echo "exit $?"
cp "$DIR/report.md" "$DIR/report-1x128-10ms-drop5.md"; cp "$DIR/pareto.png" "$DIR/pareto-1x128-10ms-drop5.png"
date; $TD sweep "${COMMON[@]}" --latency-shape 1x128 --latency-budget 5ms --max-task-drop 0.1; echo "exit $?"
cp "$DIR/report.md" "$DIR/report-1x128-5ms-drop10.md"; cp "$DIR/pareto.png" "$DIR/pareto-1x128-5ms-drop10.png"
date
