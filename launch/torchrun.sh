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
#
# Static multi-node: run the same command on every node with its NODE_RANK.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 launch/torchrun.sh launch/configs/llama-1.3b.yaml parallel.tensor=2
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ]; then
  sed -n '2,14p' "$0" >&2
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
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC_PER_NODE > 0 ? $(nproc) / NPROC_PER_NODE : 1 ))}
exec "$PYTHON" -m torch.distributed.run \
  --nproc_per_node "$NPROC_PER_NODE" --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
  -m pretrain train --config "$config" "$@"
