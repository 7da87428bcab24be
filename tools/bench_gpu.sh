#!/usr/bin/env bash
# The prepared GPU run, about 3-5 minutes on one GPU: JAX against PyTorch eager,
#   training stages 1-3 in float32 and bfloat16 (paper width, batch 16) and
#   inference 16->128 at batch 64 and 256, each device-only and end to end
#   (uint8 in host memory -> uint8 in host memory), every row timed
#   torch, JAX, JAX, torch; FLOPs, fractions of peak, memory; one table.
# Usage:
#   bash tools/bench_gpu.sh [extra bench flags, e.g. --peak_tflops=989]
#   OUT=DIR: the JSON lines go to DIR/bench_gpu.jsonl (default ./bench_gpu.jsonl)
#   BENCH_GPU_REHEARSAL=1: the same suite on the CPU at tiny sizes (tests/test_bench.py)
# Needs no network.  See progsr_jax/bench.py, progsr_jax/benchmarks/ and docs/gpu.md.
set -euo pipefail
python="${PYTHON:-python}"
out="${OUT:-.}/bench_gpu.jsonl"
mkdir -p "$(dirname "$out")"

if [[ "${BENCH_GPU_REHEARSAL:-0}" == 1 ]]; then
  echo "rehearsal: the GPU suite on the CPU at tiny sizes (timings mean nothing)"
  export JAX_PLATFORMS=cpu
  # Faster XLA:CPU compiles for a rehearsal (the code runs slower; nothing is compared).
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
  sizes=(--width=0.0625 --batch_size=2 --infer_batches=4,8 --steps=1 --warmup=0
         --torch_device=cpu --timeout=900)
else
  if ! command -v nvidia-smi >/dev/null; then
    echo "error: no NVIDIA GPU found (nvidia-smi is missing); to rehearse on the CPU:" \
         "BENCH_GPU_REHEARSAL=1 bash tools/bench_gpu.sh" >&2
    exit 1
  fi
  # One GPU for both frameworks (JAX would otherwise split the batch over all of them).
  export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader --id="${CUDA_VISIBLE_DEVICES%%,*}" || true
  if ! "$python" -c "import sys, jax; d = jax.devices()[0]; print('jax', jax.__version__, d.device_kind); sys.exit(d.platform != 'gpu')"; then
    echo "error: JAX sees no GPU; install its CUDA build: pip install -e '.[cuda12]'" >&2
    exit 1
  fi
  if ! "$python" -c "import sys, torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available()); sys.exit(not torch.cuda.is_available())"; then
    echo "warning: PyTorch is missing or has no CUDA here: the PyTorch rows will be skipped" \
         "(install a CUDA build of torch to get the ratios)" >&2
  fi
  # A second run on the same machine reuses XLA's compiled steps (persistent cache).
  export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-/tmp/progsr_jax_compile_cache}"
  sizes=(--width=1.0 --batch_size=16 --infer_batches=64,256 --steps=10 --warmup=3
         --torch_device=cuda --timeout=240)
fi
echo "JSON lines -> $out"
exec "$python" -m progsr_jax.bench --suite --stages=1,2,3 --dtypes=float32,bfloat16 \
  "${sizes[@]}" --out="$out" "$@"
