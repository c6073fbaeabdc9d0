#!/usr/bin/env bash
# Flextron's claim, small (docs/flextron.md): a whole family from a few % extra tokens. Run from the
# repo root after `source .gpu/gpu-env.sh`, in two device calls (each under the 10-minute limit):
#   bash launch/device/flextron_experiment.sh family    pretrain the base, elastify, elastic training,
#                                                       export every budget's sub-network
#   bash launch/device/flextron_experiment.sh scratch   train each exported shape from scratch on the
#                                                       same total tokens; the table to $OUT
# BASE / ELASTIC / SCRATCH: extra overrides (a CPU trial: tiny shapes, data/stdlib).
set -euo pipefail
phase=${1:?family or scratch}
R=runs/flextron
DATA=${DATA:-data/pycode-512}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if [ "$phase" = family ]; then
  [ "$DATA" != data/pycode-512 ] || bash launch/device/pycode_corpus.sh
  python3 -m pretrain train --config launch/configs/flextron-base.yaml data.path=$DATA ${BASE:-} \
    | tee "$OUT/base.log" | grep -v "^step" || true
  python3 -m pretrain elastify --checkpoint $R/base --calib-data $DATA --out $R/elastified --overwrite \
    --calib-batches 16 --batch-size 16 ${ELASTIFY:-} | tee "$OUT/elastify.log"
  # the sorted model's sub-networks before any elastic training (one step at a zero learning rate)
  python3 -m pretrain train --config launch/configs/flextron-elastic.yaml data.path=$DATA ${ELASTIC:-} \
    dir=$R/sorted training.steps=1 training.eval_every=1 optimizer.lr=1e-30 optimizer.min_lr=0 \
    schedule.warmup_steps=0 tracking.enabled=false | grep -v "^step" || true
  python3 -m pretrain train --config launch/configs/flextron-elastic.yaml data.path=$DATA ${ELASTIC:-} \
    | tee "$OUT/elastic.log" | grep -v "^step" || true
  for b in 0.25 0.5 0.75; do
    python3 -m pretrain export --checkpoint $R/elastic --budget $b --out $R/export-$b --overwrite | tee -a "$OUT/export.log"
  done
  exit 0
fi
# scratch: each exported shape (per-block widths) as a fresh model, on base + elastic tokens
steps=$(python3 -c "import json; r=[json.loads(l) for l in open('$R/base/metrics.jsonl')]; \
e=[json.loads(l) for l in open('$R/elastic/metrics.jsonl')]; print(r[-1]['step'] + e[-1]['step'])")
for b in 0.25 0.5 0.75; do
  python3 - "$b" "$steps" <<'PY'
import json, sys, yaml
b, steps = sys.argv[1], int(sys.argv[2])
run = json.load(open(f"runs/flextron/export-{b}/frugal.json"))["config"]
base = yaml.safe_load(open("runs/flextron/base/config.yaml"))
base["model"] = run["model"]  # the exported shape, everything else as the base run
base.update(name=f"flextron-scratch-{b}", dir=f"runs/flextron/scratch-{b}")
base["training"]["steps"] = steps
yaml.safe_dump(base, open(f"runs/flextron/scratch-{b}.yaml", "w"))
PY
  python3 -m pretrain train --config $R/scratch-$b.yaml ${SCRATCH:-} > "$OUT/scratch-$b.log" 2>&1 &
done
wait
python3 - <<'PY' | tee "$OUT/flextron_experiment.md"
import json
def last(run, key):
    rows = [json.loads(l) for l in open(f"runs/flextron/{run}/metrics.jsonl")]
    return next(r[key] for r in reversed(rows) if key in r), rows[-1]["step"]
base, base_steps = last("base", "val_loss")
full, el_steps = last("elastic", "val_loss")
print(f"base: {base_steps} steps; elastic continued training: {el_steps} steps "
      f"({el_steps / base_steps:.1%} of the base tokens); scratch: {base_steps + el_steps} steps\n")
print("| budget | MLP widths / heads (per block) | params (non-emb.) | sorted only | family val loss | scratch val loss | gap |")
print("|---|---|---|---|---|---|---|")
print(f"| 1.0 (full) | base model | 1.00 x | {base:.3f} | {full:.3f} | - | - |")
for b in ("0.75", "0.5", "0.25"):
    ex = json.load(open(f"runs/flextron/export-{b}/frugal.json"))["flextron"]
    sorted_only, _ = last("sorted", f"val_loss_budget_{float(b):g}")
    fam, _ = last("elastic", f"val_loss_budget_{float(b):g}")
    scr, _ = last(f"scratch-{b}", "val_loss")
    shape = f"{sorted(set(ex['mlp_widths']))} / {sorted(set(ex['query_groups']))}"
    print(f"| {b} | {shape} | {ex['predicted_cost']:.2f} x | {sorted_only:.3f} | {fam:.3f} | {scr:.3f} | {fam - scr:+.3f} |")
PY
