#!/usr/bin/env bash
# Several nodes form one pipeline (stage = global rank) through torchrun's c10d rendezvous.
# Run the same command on every node; global rank 0 serves HTTP (its host logs "ready ... http://").
#
#   # on each of 2 nodes, 4 GPUs each -> an 8-stage pipeline
#   NNODES=2 NPROC=4 RDZV=node0.example:29500 HOST=0.0.0.0 launch/serve_multi_node.sh model=llama-13b dtype=bf16
#
# RDZV must be reachable from every node (host:port of one node, usually the first).
# Any further argument is passed to `python -m eet_pipe.serve`.
set -euo pipefail

export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

: "${NNODES:?set NNODES (number of nodes)}"
: "${RDZV:?set RDZV=host:port of the rendezvous (one of the nodes)}"
NPROC="${NPROC:-$(nvidia-smi -L 2>/dev/null | wc -l)}"
RDZV_ID="${RDZV_ID:-eet-pipe-serve}"
PORT="${PORT:-8000}"
HOST="${HOST:-0.0.0.0}"
STAGES=$((NNODES * NPROC))

exec torchrun --nnodes "${NNODES}" --nproc-per-node "${NPROC}" \
    --rdzv-backend c10d --rdzv-endpoint "${RDZV}" --rdzv-id "${RDZV_ID}" --max-restarts 0 \
    -m eet_pipe.serve --stages "${STAGES}" --host "${HOST}" --port "${PORT}" plan=even "$@"
