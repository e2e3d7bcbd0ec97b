#!/usr/bin/env bash
# The main job end to end on real data: fetch the real all-MiniLM-L6-v2 encoder, fine-tune it
# briefly on SST-2 (the predecessor, 6 layers), compress it to 3 layers with BERT-of-Theseus,
# evaluate both on the SST-2 dev set and print the table. About 15 minutes on 2 CPU cores.
#   STEPS_FT=400 STEPS_COMPRESS=800 RUNS=runs/demo bash scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
TD=${TD:-.venv/bin/theseus-deploy}
PY=${PY:-.venv/bin/python}
RUNS=${RUNS:-runs/demo}
STEPS_FT=${STEPS_FT:-400}
STEPS_COMPRESS=${STEPS_COMPRESS:-800}
SEQ=${SEQ:-64}
MODEL=${MODEL:-$HOME/.cache/theseus-models/all-MiniLM-L6-v2}

if [ ! -f "$MODEL/config.json" ]; then
  if [ -x ../shared/scripts/fetch-pretrained.sh ] || [ -f ../shared/scripts/fetch-pretrained.sh ]; then
    PYTHON="$PY" bash ../shared/scripts/fetch-pretrained.sh minilm "$MODEL"
  else
    MODEL=sentence-transformers/all-MiniLM-L6-v2   # from the hub
  fi
fi
mkdir -p "$RUNS"
set -x
"$TD" finetune --model "$MODEL" --task sst2 --output "$RUNS/predecessor" --overwrite \
  --max-steps "$STEPS_FT" --lr 5e-5 --max-seq-length "$SEQ" --eval-steps "$STEPS_FT"
"$TD" compress --model "$RUNS/predecessor" --task sst2 --output "$RUNS/successor" --overwrite \
  --max-steps "$STEPS_COMPRESS" --lr 1e-4 --max-seq-length "$SEQ" --eval-steps $((STEPS_COMPRESS / 3))
"$TD" evaluate --model "$RUNS/predecessor" --task sst2 --max-seq-length "$SEQ" --output "$RUNS/eval-predecessor.json" --overwrite
"$TD" evaluate --model "$RUNS/successor" --task sst2 --max-seq-length "$SEQ" --output "$RUNS/eval-successor.json" --overwrite
set +x
"$PY" - "$RUNS" <<'PY'
import json, sys
runs = sys.argv[1]
p, s = (json.load(open(f"{runs}/eval-{n}.json")) for n in ("predecessor", "successor"))
print(f"\nSST-2 dev ({p['num_examples']} sentences)")
print(f"{'model':<14}{'layers':>7}{'accuracy':>10}{'eval s':>8}")
for name, r in (("predecessor", p), ("successor", s)):
    print(f"{name:<14}{r['num_layers']:>7}{r['metrics']['accuracy']:>10.4f}{r['seconds']:>8.1f}")
print(f"retention {100 * s['metrics']['score'] / p['metrics']['score']:.1f}%, "
      f"dev-set eval speedup {p['seconds'] / s['seconds']:.2f}x (one noisy run; see `theseus-deploy bench`)")
PY
