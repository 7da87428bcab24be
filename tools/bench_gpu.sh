#!/usr/bin/env bash
# JAX vs PyTorch on one GPU: stages 1-3 (full training iteration, batch 16) and
# inference faces/s; about 3-5 minutes.  Usage:
#   bash tools/bench_gpu.sh [OUT.jsonl] [extra bench flags, e.g. --dtype=bfloat16 --peak_tflops=989]
set -euo pipefail
out="${1:-bench_gpu.jsonl}"
shift || true
if ! command -v nvidia-smi >/dev/null; then
  echo "error: no NVIDIA GPU found (nvidia-smi is missing)" >&2
  exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import jax; print('jax', jax.__version__, jax.devices())"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
python -m progsr_jax.bench --suite --batch_size=16 --steps=20 --warmup=3 --out="$out" "$@"
