#!/usr/bin/env bash
# One node, one pipeline stage per GPU, started by torchrun; rank 0 serves HTTP.
#
#   launch/serve_single_node.sh model=gpt2-xl weights=random dtype=fp16
#   NPROC=2 PORT=8080 HOST=0.0.0.0 launch/serve_single_node.sh model=/models/llama-7b dtype=bf16
#
# Any further argument is passed to `python -m eet_pipe.serve` (key=value options, --api-key K, ...).
set -euo pipefail

# NVLink multicast stays off in every process eet_pipe starts (see docs/SERVE.md).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

NPROC="${NPROC:-$(nvidia-smi -L 2>/dev/null | wc -l)}"
if [ "${NPROC}" -lt 1 ]; then
    echo "no GPU found: set NPROC (CPU stages use gloo)" >&2
    exit 2
fi
PORT="${PORT:-8000}"
HOST="${HOST:-127.0.0.1}"

exec torchrun --standalone --nnodes 1 --nproc-per-node "${NPROC}" \
    -m eet_pipe.serve --stages "${NPROC}" --host "${HOST}" --port "${PORT}" "$@"
