#!/usr/bin/env bash
# docs/results.md at full budget (issue: whole-epoch predecessors, compress's default budget):
# every task's predecessor, the ablation on SST-2 and MRPC, then the grid with the ablation's
# chosen variant. Several runs at a time: meant for a CUDA GPU (16 jobs fit an H100/H200 with
# MiniLM); on 2 CPU cores use JOBS=1 and expect days, not hours.
#   MODEL=~/.cache/theseus-models/all-MiniLM-L6-v2 DATA_DIR=../shared/data/glue JOBS=16 bash scripts/results_full.sh
# Finished runs are skipped, so the script can be re-run after an interruption.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}; [ -x "$PY" ] || PY=python3
MODEL=${MODEL:-$HOME/.cache/theseus-models/all-MiniLM-L6-v2}
ROOT=${ROOT:-runs/results-full}; DOC=${DOC:-docs/results.md}; JOBS=${JOBS:-1}
export TOKENIZERS_PARALLELISM=false
[ "$JOBS" -gt 1 ] && export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # many small runs: one thread each
R=("$PY" scripts/results.py ${DRY_RUN:+--dry-run} --profile full --model "$MODEL" --root "$ROOT" --doc "$DOC" ${DATA_DIR:+--data-dir "$DATA_DIR"})
T0=$(date +%s); el() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
el "predecessors";  "${R[@]}" predecessors --tasks sst2,mrpc,cola,stsb,rte --predecessor-seed 42 --jobs "$JOBS"
el "ablation";      "${R[@]}" ablation --tasks sst2,mrpc --seeds 42,43 --jobs "$JOBS"
el "grid";          "${R[@]}" run --from-ablation --tasks cola,mrpc,rte --seeds 42,43,44 --predecessor-seed 42 --constant-seeds 42 --jobs "$JOBS"
                    "${R[@]}" run --from-ablation --tasks sst2,stsb --seeds 42 --predecessor-seed 42 --jobs "$JOBS"
el "done: $DOC"
