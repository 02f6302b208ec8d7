#!/usr/bin/env bash
# The one prepared script for a lent GPU (see README "Benchmarks"): kernel-path parity
# against the CPU/reference paths, then GPU throughput and memory, all written under $OUT
# (the device tool's output folder) or benchmarks/results/gpu.
#
#   bash benchmarks/gpu_check.sh
#
# mamba-ssm / causal-conv1d are used when importable (carry them as wheels); without them
# the CUDA runs exercise the pure-PyTorch chunked paths on the GPU, and the parity tests
# marked `gpu` report what they skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
  $PY -c "from cald_scale.mixers.ops._cuda import kernels_available; print('mamba kernels:', kernels_available())"
} 2>&1 | tee "$OUT_DIR/gpu_env.txt"
$PY -m pytest tests/unit/test_mixer_ops.py tests/unit/test_mixers.py -q -rs 2>&1 | tee "$OUT_DIR/gpu_parity.txt"
$PY benchmarks/mixer_speed.py --out "$OUT_DIR/mixer_speed_gpu.json" 2>&1 | tail -40
$PY benchmarks/streaming_memory.py --out "$OUT_DIR/streaming_memory_gpu.json" 2>&1 | tail -40
