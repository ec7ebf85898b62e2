#!/usr/bin/env bash
# GPU verification and figures in one go: build the kernels, run the GPU tests, run the pipeline
# benchmarks on the first two GPUs. Usage: benchmarks/gpu_suite.sh OUTDIR
set -uo pipefail
OUT_DIR=${1:-bench_results}
mkdir -p "$OUT_DIR"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export EET_PIPE_JIT=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
LOG="$OUT_DIR/gpu_suite.log"
{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nvidia-smi topo -m
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
  echo "== build kernels"; time python3 -c "import eet_pipe.ops as o; print('HAVE_EXT', o.HAVE_EXT, o.EXT_REASON)"
  echo "== gpu tests"
  timeout 300 python3 -m pytest -q -m "cuda or multigpu" -p no:cacheprovider -s \
      tests/integration/test_gpu_parity.py tests/distributed/test_multigpu.py 2>&1 | grep -v "it/s"
  echo "== pipeline prefill"
  timeout 240 python3 benchmarks/pipeline_prefill.py model=gpt2-xl weights=random dtype=fp16 devices=cuda:0,cuda:1 \
      batch=32 seq=512 microbatches=4,8,16,32 warmup=1 repeats=3 out="$OUT_DIR/pipeline_prefill" 2>&1 | grep -v "it/s"
  echo "== pipeline decode"
  timeout 180 python3 benchmarks/pipeline_decode.py model=gpt2-xl weights=random dtype=fp16 devices=cuda:0,cuda:1 \
      prompt=32 new=64 batch=32 repeats=2 out="$OUT_DIR/pipeline_decode" 2>&1 | grep -v "it/s"
  date -u
} 2>&1 | tee "$LOG"
