#!/usr/bin/env bash
# docs/results.md at full budget (whole-epoch predecessors, compress's default budget):
# every task's predecessor, the ablation on SST-2 and MRPC, then the grid with the ablation's
# chosen variant. Several runs at a time: meant for a CUDA GPU (16 jobs fit an H100/H200 with
# MiniLM); on 2 CPU cores JOBS=2 PRECISION=bf16 and expect most of a day.
#   MODEL=~/.cache/theseus-models/all-MiniLM-L6-v2 DATA_DIR=../shared/data/glue JOBS=16 bash scripts/results_full.sh
# Finished runs are skipped, so the script can be re-run after an interruption.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}; [ -x "$PY" ] || PY=python3
MODEL=${MODEL:-$HOME/.cache/theseus-models/all-MiniLM-L6-v2}
ROOT=${ROOT:-runs/results-full}; DOC=${DOC:-docs/results.md}; JOBS=${JOBS:-1}
# PRECISION=bf16: every run trains with bf16 autocast (about 2x faster on CPUs with AVX512-BF16).
# ABLATION_TASKS / ABLATION_SEEDS: where the ablation runs (default: SST-2 and MRPC, seeds 42 and 43).
# An empty ABLATION_TASKS skips the ablation (the grid then runs compress's defaults).
# TASKS: the grid's tasks; SEED_TASKS: those of them that also get seeds 43 and 44 (empty: none).
# LAYERS: successor depth. MPNet 12 -> 6 on SST-2 and MRPC, seed 42, no ablation (sized for one GPU):
#   MODEL=<all-mpnet-base-v2 folder> LAYERS=6 TASKS=sst2,mrpc SEED_TASKS= ABLATION_TASKS= PRECISION=bf16 JOBS=4 \
#   ROOT=runs/results-mpnet DOC=docs/results-mpnet.md DATA_DIR=../shared/data/glue bash scripts/results_full.sh
PRECISION=${PRECISION:-no}; LAYERS=${LAYERS:-3}; ABLATION_TASKS=${ABLATION_TASKS-sst2,mrpc}; ABLATION_SEEDS=${ABLATION_SEEDS:-42,43}
TASKS=${TASKS:-cola,sst2,mrpc,stsb,rte}; SEED_TASKS=${SEED_TASKS-cola,mrpc,rte}
export TOKENIZERS_PARALLELISM=false
[ "$JOBS" -gt 1 ] && export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # many small runs: one thread each
R=("$PY" scripts/results.py ${DRY_RUN:+--dry-run} --profile full --mixed-precision "$PRECISION" --successor-layers "$LAYERS" --model "$MODEL"
   --root "$ROOT" --doc "$DOC" ${DATA_DIR:+--data-dir "$DATA_DIR"})
T0=$(date +%s); el() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
el "predecessors";  "${R[@]}" predecessors --tasks "$TASKS" --predecessor-seed 42 --jobs "$JOBS"
if [ -n "$ABLATION_TASKS" ]; then
  el "ablation";    "${R[@]}" ablation --tasks "$ABLATION_TASKS" --seeds "$ABLATION_SEEDS" --jobs "$JOBS"
fi
# seed 42 of every task first (one complete table early), then the other seeds of the small tasks
el "grid seed 42";  "${R[@]}" run --from-ablation --tasks "$TASKS" --seeds 42 --predecessor-seed 42 --jobs "$JOBS"
# the constant rate gets the same seeds: the targets compare medians of 3 seeds
if [ -n "$SEED_TASKS" ]; then
  el "grid 43,44";  "${R[@]}" run --from-ablation --tasks "$SEED_TASKS" --seeds 43,44 --predecessor-seed 42 --jobs "$JOBS"
fi
# speed of the successor vs its predecessor (shapes, not weights, set it: one task's pair serves all);
# on 2 CPU cores it wants a quiet machine, so it runs last
el "bench";         "${R[@]}" bench --tasks "${BENCH_TASK:-mrpc}"
el "done: $DOC"
