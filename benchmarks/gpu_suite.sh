#!/usr/bin/env bash
# The GPU CI and the GPU figures: build the kernels, run every test marked cuda or multigpu, run the benchmarks
# on the first two GPUs (DEVICES=cuda:0,cuda:1,cuda:2,cuda:3 for more). Run `benchmarks/gpu_suite.sh OUT tests`
# on a GPU machine before any change to csrc/, eet_pipe/ops/ or eet_pipe/runtime/ lands. Usage:
#   benchmarks/gpu_suite.sh OUTDIR [tests] [prefill] [decode] [schedules] [partitions] [single] [single8b] [profile] [kernels] [serve]
# (no part named = all). Knobs: DEVICES, GPU_TESTS (default: the whole tests/ tree, selected by marker; on one GPU
# the multi-GPU tests are listed as skipped), <PART>_S time limits, SCHEDULES_ARGS, SCHEDULES_DECODE=0,
# SINGLE_ARGS, KERNELS_ARGS, SERVE_LEVELS, SERVE_REQUESTS, SERVE_CLIENTS (load generator processes), SERVE_ARGS
# (server options of every serve run), SERVE_VARIANTS ("name=options|name=options": one serve run each, e.g.
# "one=|two=api_servers=2 clients=8|h11=http_parser=h11"; the first also measures the engine), EXT_CACHE (a tarball of a
# previous run's JIT build, OUTDIR/ext.tgz, unpacked first so unchanged kernels are not compiled again). Every part
# has its own time limit, so one hang cannot eat the others.
set -uo pipefail
OUT_DIR=${1:-bench_results}; shift || true
PARTS=${*:-tests prefill decode schedules partitions single single8b profile kernels serve}
mkdir -p "$OUT_DIR"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export EET_PIPE_JIT=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
XL="model=gpt2-xl weights=random dtype=fp16"
DEVICES=${DEVICES:-cuda:0,cuda:1}
TWO="devices=$DEVICES"
NSTAGES=$(awk -F, '{print NF}' <<< "$DEVICES")
has() { [[ " $PARTS " == *" $1 "* ]]; }
{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nvidia-smi topo -m
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
  if [[ -n ${EXT_CACHE:-} && -f $EXT_CACHE ]]; then  # sources older than the cached objects: ninja rebuilds only changes
    mkdir -p ~/.cache/eet_pipe && tar xzf "$EXT_CACHE" -C ~/.cache/eet_pipe && touch -d 2000-01-01 csrc/*
  fi
  echo "== build kernels"; time python3 -c "import eet_pipe.ops as o; print('HAVE_EXT', o.HAVE_EXT, o.EXT_REASON)"
  tar czf "$OUT_DIR/ext.tgz" -C ~/.cache/eet_pipe ext 2>/dev/null
  if has tests; then
    echo "== gpu tests: every test marked cuda or multigpu ($(nvidia-smi -L | wc -l) GPU(s); skipped ones listed with why)"
    timeout ${TESTS_S:-420} python3 -m pytest -q -m "cuda or multigpu" -p no:cacheprovider -rs --timeout 300 \
        ${GPU_TESTS:-tests} 2>&1 | grep -v "it/s" | tee "$OUT_DIR/gpu_tests.log" | tail -60
  fi
  has prefill && timeout ${PREFILL_S:-240} python3 -m benchmarks.pipeline_prefill $XL $TWO batch=32 seq=512 microbatches=4,8,16,32 \
      warmup=2 repeats=3 out="$OUT_DIR/pipeline_prefill" 2>&1 | grep -v "it/s" | tail -20
  has decode && timeout ${DECODE_S:-180} python3 -m benchmarks.pipeline_decode $XL $TWO prompt=32 new=64 batch=32 repeats=2 \
      out="$OUT_DIR/pipeline_decode" 2>&1 | grep -v "it/s" | tail -10
  has schedules && timeout ${SCHEDULES_S:-300} python3 -m benchmarks.schedules $XL $TWO batch=32 seq=512 ${SCHEDULES_ARGS:-microbatches=1,4,16,32} \
      out="$OUT_DIR/schedules/schedules" 2>&1 | grep -v "it/s" | tail -25
  has schedules && [[ ${SCHEDULES_DECODE:-1} == 1 ]] && timeout ${SCHEDULES_S:-300} python3 -m benchmarks.schedules $XL $TWO workload=decode batch=64 prompt=32 \
      new=64 microbatches=1,2,4,8 out="$OUT_DIR/schedules/decode" 2>&1 | grep -v "it/s" | tail -8
  has partitions && timeout ${PARTITIONS_S:-240} python3 -m benchmarks.partitions $XL $TWO batch=8 seq=512 microbatches=8 \
      out="$OUT_DIR/partitions" 2>&1 | grep -v "it/s" | tail -20
  has single && timeout ${SINGLE_S:-420} python3 -m benchmarks.single_gpu model=gpt2-xl weights=random device=cuda:0 \
      ${SINGLE_ARGS:-dtype=fp16 batches=1,16,64 prompt=32 new_tokens=128 prefill=32x512 repeats=3 systems=hf,static,fp16,int8 tune=no} \
      out="$OUT_DIR/single_gpu" 2>&1 \
      | grep -v "it/s" | tail -60
  has single8b && timeout ${SINGLE8B_S:-420} python3 -m benchmarks.single_gpu model=llama-3-8b weights=random dtype=bf16 \
      device=cuda:0 batches=1,64 prompt=32 new_tokens=128 prefill=8x2048 repeats=3 systems=hf,static,bf16 tune=no \
      out="$OUT_DIR/single_gpu_llama3_8b" 2>&1 | grep -v "it/s" | tail -30
  has profile && EET_PIPE_GEMV=0 timeout ${PROFILE_S:-120} python3 -m benchmarks.decode_profile model=gpt2-xl weights=random dtype=fp16 \
      device=cuda:0 batches=1,64 out="$OUT_DIR/decode_profile" 2>&1 | grep -v "it/s" | tail -30
  has profile && EET_PIPE_GEMV=1 timeout ${PROFILE_S:-120} python3 -m benchmarks.decode_profile \
      model=gpt2-xl weights=random dtype=fp16 device=cuda:0 batches=1,8 out="$OUT_DIR/decode_profile_gemv" 2>&1 \
      | grep -v "it/s" | tail -30
  has kernels && timeout ${KERNELS_S:-120} python3 -m benchmarks.kernel_timings device=cuda:0 ${KERNELS_ARGS:-} out="$OUT_DIR/kernels" 2>&1 \
      | grep -v "it/s" | tail -60
  if has serve; then  # one serve_load per variant; the first measures the engine, the others reuse its figures
    IFS='|' read -ra variants <<< "${SERVE_VARIANTS:-load=}"
    first=""
    for variant in "${variants[@]}"; do
      name=${variant%%=*}; server=""; clients=${SERVE_CLIENTS:-auto}
      for word in ${variant#*=}; do  # clients=N is the load generator's; every other word a server option
        case $word in clients=*) clients=${word#clients=} ;; *) server+=" $word" ;; esac
      done
      reference=${first:+$OUT_DIR/serve_$first.json}
      echo "== serve $name:${server:- (defaults)}, clients=$clients"
      timeout ${SERVE_S:-300} python3 -m benchmarks.serve_load model=gpt2-xl stages=$NSTAGES \
          concurrency=${SERVE_LEVELS:-1,4,16,64,256} requests=${SERVE_REQUESTS:-256} max_tokens=64 prompt_len=64 \
          trace=on clients=$clients reference=${reference:-auto} \
          "server_args=weights=random dtype=fp16 $TWO ${SERVE_ARGS:-}$server" out="$OUT_DIR/serve_$name" 2>&1 \
          | grep -v "it/s" | tail -40
      gzip -f "$OUT_DIR/serve_${name}_trace.json"
      first=${first:-$name}
    done
  fi
  date -u
} 2>&1 | tee "$OUT_DIR/gpu_suite.log"
