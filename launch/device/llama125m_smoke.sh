#!/usr/bin/env bash
# GPU smoke test of the foundation (one H200 through the device tool):
#   prepare the interpreter's own standard library as a corpus (32k BPE, 2048-token sequences),
#   train llama-125m for STEPS steps (bf16, ZeRO-1), generate a sample, copy the metrics to $OUT.
# Run from the repo root after `source .gpu/gpu-env.sh`.
set -euo pipefail
STEPS=${STEPS:-300}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv | tee "$OUT/gpu.txt"
stdlib=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
python3 -m pretrain prepare-data --input "$stdlib/*.py" "$stdlib/[!t]*/**/*.py" --tokenizer train --vocab-size 32000 \
    --seq-len 2048 --samples-per-shard 256 --val-fraction 0.01 --out data/stdlib-2k --overwrite
python3 -m pretrain train --config launch/configs/llama-125m.yaml training.steps="$STEPS" \
    checkpoint.every=0 2>&1 | tee "$OUT/train.log"
python3 -m pretrain generate --checkpoint runs/llama-125m --prompt "import os" --max-new-tokens 48 \
    | tee "$OUT/sample.txt"
cp runs/llama-125m/metrics.jsonl "$OUT/"
python3 - <<'PY' | tee "$OUT/summary.txt"
import json, statistics
rows = [json.loads(l) for l in open("runs/llama-125m/metrics.jsonl") if '"loss"' in l]
steady = rows[len(rows) // 5:]  # skip warm-up / compile steps
med = lambda k: statistics.median(r[k] for r in steady)
print(f"steps {rows[0]['step']}-{rows[-1]['step']}: loss {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f}")
print(f"median tokens/s {med('tokens_per_sec'):,.0f} | MFU {med('mfu'):.1%} | step {med('step_time_s')*1e3:.0f} ms"
      f" | peak mem {max(r['mem_gib'] for r in rows):.1f} GiB")
PY
