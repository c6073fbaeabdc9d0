#!/usr/bin/env bash
# The GPU scaling study of docs/scaling.md, through the device tool (run from the repo root after
# `source .gpu/gpu-env.sh`). Resumable: call it again until every run has finished.
#   bash launch/device/scaling_study.sh SECONDS [STUDY [--only NAME ...]]   (STUDY: llama-vs-subllm)
# 1. the corpus: the Python sources of this machine's interpreter (stdlib + site-packages, torch
#    included: ~400 MB), an 8k byte-level BPE, 512-token sequences (prepared once);
# 2. `scaling run` for at most SECONDS (interrupted runs resume from their checkpoints next time);
# 3. the study folder, without checkpoints, to $OUT/study.tar.gz (mlflow.db, run logs, configs).
set -euo pipefail
limit=${1:?seconds}; shift
study=${1:-llama-vs-subllm}; shift || true
bash launch/device/pycode_corpus.sh
python3 -m pretrain scaling plan --study $study "$@"
timeout -s TERM "$limit" python3 -m pretrain scaling run --study $study "$@" || echo "scaling run stopped: $?"
# $OUT brings back at most 8 files: one archive of the study (its checkpoints stay behind)
(cd runs/studies && find $study -path "$study/runs/*/checkpoints" -prune -o -type f -print | \
    tar -czf "$OUT/study.tar.gz" -T -)
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python3 -c 'import torch; print("torch", torch.__version__)'; date -u; } > "$OUT/gpu.txt"
