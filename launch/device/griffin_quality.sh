#!/usr/bin/env bash
# GRIFFIN's quality on a model trained with the framework (docs/griffin.md), one device call: the
# pycode corpus, a 125M-shaped LLaMA (launch/configs/griffin-125m.yaml, cut at TRAIN_S seconds if
# slower than planned: checkpoints every 400 steps), then eval-griffin on 128 held-out sequences.
# Run from the repo root after `source .gpu/gpu-env.sh`; results to $OUT.
set -euo pipefail
# DATA / RUN / TRAIN / EVAL: another prepared corpus and extra overrides (a CPU trial: tiny shapes, data/stdlib).
OUT=${OUT:-/tmp/out}
DATA=${DATA:-data/pycode-512}
RUN=${RUN:-runs/griffin-125m}
mkdir -p "$OUT"
[ "$DATA" != data/pycode-512 ] || bash launch/device/pycode_corpus.sh
timeout "${TRAIN_S:-420}" python3 -m pretrain train --config launch/configs/griffin-125m.yaml data.path=$DATA dir=$RUN ${TRAIN:-} \
  > "$OUT/train.log" 2>&1 || echo "training stopped (exit $?): evaluating its last checkpoint"
grep -v "^step" "$OUT/train.log" | tail -5 || true
python3 -m pretrain eval-griffin --checkpoint $RUN --data $DATA --docs 128 \
  --prompt-len 256 --gen-tokens 64 --batch 32 --out "$OUT/eval_griffin.json" ${EVAL:-} | tee "$OUT/eval_griffin.md"
