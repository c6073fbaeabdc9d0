#!/usr/bin/env bash
# Launch training with torchrun, single- or multi-node.
#
#   launch/torchrun.sh CONFIG [dotted.key=value ...]
#
# Environment (defaults in brackets):
#   NPROC_PER_NODE  processes per node [number of GPUs, or 1 on a CPU box]
#   NNODES          number of nodes [1]
#   NODE_RANK       this node's index [0]
#   MASTER_ADDR     address of node 0 [127.0.0.1]
#   MASTER_PORT     rendezvous port [29500]
#   PYTHON          interpreter [.venv/bin/python if present, else python3]
#   MAX_RESTARTS    elastic restarts: when a worker fails, torchrun restarts all workers up to this
#                   many times, each resuming from the latest checkpoint (checkpoint.resume=auto) [0]
#
# Static multi-node: run the same command on every node with its NODE_RANK.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 launch/torchrun.sh launch/configs/llama-1.3b.yaml parallel.tensor=2
# Under Slurm, launch/slurm.sbatch runs this script on every node (launch/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ]; then
  sed -n '2,17p' "$0" >&2
  exit 2
fi
config=$1; shift
if [ ! -f "$config" ]; then
  echo "error: config $config does not exist" >&2
  exit 2
fi
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
if [ -z "${NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE=$($PYTHON -c 'import torch; print(torch.cuda.device_count() or 1)')
fi
MAX_RESTARTS=${MAX_RESTARTS:-0}
case $MAX_RESTARTS in ''|*[!0-9]*) echo "error: MAX_RESTARTS must be a whole number, got $MAX_RESTARTS" >&2; exit 2;; esac
resume=()
# a restart must continue from the latest checkpoint, whatever the overrides say (last one wins)
[ "$MAX_RESTARTS" -gt 0 ] && resume=(checkpoint.resume=auto)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC_PER_NODE > 0 ? $(nproc) / NPROC_PER_NODE : 1 ))}
exec "$PYTHON" -m torch.distributed.run \
  --nproc_per_node "$NPROC_PER_NODE" --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
  --max-restarts "$MAX_RESTARTS" \
  -m pretrain train --config "$config" "$@" ${resume[@]+"${resume[@]}"}
