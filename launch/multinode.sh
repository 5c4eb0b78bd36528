#!/usr/bin/env bash
# One node of a multi-node run: start this script on every node, with the same environment. Each
# node's torchrun starts NPROC_PER_NODE processes; the nodes meet at MASTER_ADDR:MASTER_PORT
# (torchrun's c10d rendezvous: node ranks are assigned as the nodes arrive).
#
#   NNODES=4 MASTER_ADDR=node001 launch/multinode.sh +recipe=tiny \
#       'stages=[cpt]' cpt.batch_size=64 run_dir=/shared/runs/tiny engine.parallel=fsdp2
#
# Environment:
#   NNODES          number of nodes (required)
#   MASTER_ADDR     host name or address of one of the nodes, reachable from all of them (required)
#   MASTER_PORT     free TCP port on that host (default 29500)
#   NPROC_PER_NODE  processes per node (default: the number of GPUs torch sees on this node)
#   RUN_ID          rendezvous id, the same on every node and different for concurrent runs
#                   (default moe_adapt-$MASTER_PORT)
#   PYTHON          the interpreter of the environment moe_adapt is installed in (default python)
#   TORCHRUN_ARGS   extra torchrun options, e.g. "--max-restarts 2"
# run_dir must be on a disk every node sees: rank 0 writes it, every rank reads its checkpoints.
set -euo pipefail

PYTHON="${PYTHON:-python}"
: "${NNODES:?set NNODES to the number of nodes}"
: "${MASTER_ADDR:?set MASTER_ADDR to a host every node can reach (the rendezvous)}"
port="${MASTER_PORT:-29500}"
nproc="${NPROC_PER_NODE:-$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')}"
if [[ "$nproc" -lt 1 ]]; then
    echo "launch/multinode.sh: no GPU visible on $(hostname); set NPROC_PER_NODE" >&2
    exit 2
fi

# shellcheck disable=SC2086  # TORCHRUN_ARGS is a list of options
exec "$PYTHON" -m torch.distributed.run \
    --nnodes "$NNODES" \
    --nproc-per-node "$nproc" \
    --rdzv-backend c10d \
    --rdzv-endpoint "$MASTER_ADDR:$port" \
    --rdzv-id "${RUN_ID:-moe_adapt-$port}" \
    ${TORCHRUN_ARGS:-} \
    -m moe_adapt "$@"
