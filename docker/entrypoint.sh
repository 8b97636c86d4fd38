#!/bin/bash
# torchrun -m launch.train with one process per visible GPU (or NPROC_PER_NODE); arguments
# are Hydra overrides. Multi-node: set NNODES, NODE_RANK's rendezvous with RDZV_ENDPOINT.
set -euo pipefail
NPROC=${NPROC_PER_NODE:-$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")}
if [ -n "${RDZV_ENDPOINT:-}" ]; then
    exec torchrun --nnodes="${NNODES:-1}" --nproc-per-node="$NPROC" --rdzv-backend=c10d \
        --rdzv-endpoint="$RDZV_ENDPOINT" --rdzv-id="${RDZV_ID:-quintet}" -m launch.train "$@"
fi
exec torchrun --standalone --nproc-per-node="$NPROC" -m launch.train "$@"
