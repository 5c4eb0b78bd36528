#!/usr/bin/env bash
# One node, several processes: torchrun starts NPROC copies of `python -m moe_adapt`, one per GPU
# (nccl), or NPROC CPU processes over gloo when no GPU is visible.
#
#   launch/torchrun.sh [NPROC] [moe_adapt overrides ...]
#   launch/torchrun.sh 8 +recipe=tiny 'stages=[cpt]' engine.parallel=ddp
#   launch/torchrun.sh 2 +recipe=tiny 'stages=[cpt]'          # CPU: two processes over gloo
#
# NPROC defaults to the number of GPUs torch sees. PYTHON (default: python) is the interpreter of the
# environment moe_adapt is installed in. Extra torchrun options go in TORCHRUN_ARGS, e.g.
# TORCHRUN_ARGS="--local-ranks-filter 0" to show rank 0's output only.
set -euo pipefail

PYTHON="${PYTHON:-python}"
nproc=""
if [[ $# -gt 0 && "$1" =~ ^[0-9]+$ ]]; then
    nproc="$1"
    shift
fi
if [[ -z "$nproc" ]]; then
    nproc="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')"
    if [[ "$nproc" -lt 1 ]]; then
        echo "launch/torchrun.sh: no GPU visible; give the number of CPU processes first, e.g. launch/torchrun.sh 2 ..." >&2
        exit 2
    fi
fi

# --standalone: a rendezvous on a free local port, so several runs can share the node
# shellcheck disable=SC2086  # TORCHRUN_ARGS is a list of options
exec "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$nproc" ${TORCHRUN_ARGS:-} \
    -m moe_adapt "$@"
