#!/usr/bin/env bash
# The lent GPU machine's software, rehearsed on a CPU machine before its minutes are spent.
#
#   bash benchmarks/gpu_rehearsal.sh [TOOLCHAIN_DIR]    # default ~/.cache/cald_scale/cu312
#
# TOOLCHAIN_DIR is the Python 3.12 venv with PyPI's torch 2.11.0 (+cu130: the image's own build)
# that `launch/build_gpu_wheels.sh --compile --toolchain DIR` makes. This script adds the image's
# packages that our code and the carried wheels rely on, runs gpu_check.sh's install and kernel
# steps (every kernel group must import: the compiled extensions link against that torch), then
# each benchmark gpu_check.sh runs, on the CPU at tiny sizes, with gpu_wheels/ installed as
# gpu_check.sh installs them. What it catches: a wheel that does not install or import, a
# package the image lacks, code that needs a newer torch or Python than the image's. What it
# cannot: anything that happens on the GPU itself. About 3 minutes on 2 cores.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
TOOLCHAIN=${1:-${CALD_SCALE_CACHE:-$HOME/.cache/cald_scale}/cu312}
PY=$TOOLCHAIN/bin/python
# NOTE: its python runs as you: one someone else made (a shared /tmp) could run anything.
if [ -e "$TOOLCHAIN" ] && { [ ! -O "$TOOLCHAIN" ] || { [ -e "$PY" ] && [ ! -O "$PY" ]; }; }; then
  echo "$TOOLCHAIN is not yours: use a toolchain you made (bash launch/build_gpu_wheels.sh --compile --toolchain DIR)" >&2
  exit 1
fi
if [ ! -x "$PY" ]; then
  echo "no $PY: make it with bash launch/build_gpu_wheels.sh --compile --toolchain $TOOLCHAIN" >&2
  exit 1
fi
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_rehearsal.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# NOTE: the image's own packages (the device tool's KINDS.md lists them) that the wheels in
# gpu_wheels/ leave out: deepspeed imports msgpack, psutil and py-cpuinfo; the benchmarks plot.
"$PY" -m pip install -q numpy einops msgpack psutil py-cpuinfo matplotlib accelerate safetensors 2>&1 | grep -v "is ignored" || true

failed=()
OUT=$WORK/gpu_check PYTHON=$PY GPU_CHECK_PARSE_ONLY=1 bash benchmarks/gpu_check.sh >"$WORK/gpu_check.out" 2>&1
sed -n '/== kernels/,/^gpu_check done/p' "$WORK/gpu_check/gpu_check.log"
grep -q "mixer kernel='cuda' resolves to cuda" "$WORK/gpu_check/gpu_check.log" || failed+=("gpu_check kernels: not every kernel group imports")

"$PY" -m pip install -q --no-deps --no-index --no-compile --target "$WORK/site" gpu_wheels/*.whl
export PYTHONPATH=$WORK/site:$PWD CALD_SCALE_CACHE=$WORK/cache CALD_TRITON_AUTOTUNE_CACHE=$WORK/triton_autotune.json
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline

bench() {  # bench NAME[:LABEL] ARGS...: one benchmark on the CPU, its output kept (under LABEL when given)
  local name=${1%%:*} label=${1#*:}
  shift
  echo "== $label: $*"
  if "$PY" "benchmarks/$name.py" --device cpu "$@" --out "$WORK/$label.json" >"$WORK/$label.log" 2>&1; then
    echo "   ok"
  else
    tail -n 20 "$WORK/$label.log"
    failed+=("$label")
  fi
}
bench kernel_parity --shapes small --dtypes float32 --seqlen 64
bench mixer_speed --layers 1 --batch 1 --seqlen 64 --repeats 1 --no-report
bench inference_speed --geometry SmolLM2-135M --contexts 128 --batches 1 --decode_steps 2 --graph-decode on
bench inference_speed:inference_speed_hybrid --geometry SmolLM2-135M --attention_every 4 --contexts 128 --batches 1,2 --decode_steps 2 \
  --best_batch off --graph-decode on
bench train_speed --quick --warmup 0 --steps 1 --seq_len 64 --time-budget 0 --build parallel
if [ -s "$WORK/train_speed.json" ]; then  # the script writes its result even when an item fails
  "$PY" -c "import json, sys; items = json.load(open(sys.argv[1]))['items']; bad = {k: v['error'][-300:] for k, v in items.items() if 'error' in v}; print(bad) if bad else None; sys.exit(bool(bad))" \
    "$WORK/train_speed.json" || failed+=("train_speed items")
fi

if ((${#failed[@]})); then
  echo "rehearsal FAILED: ${failed[*]}"
  exit 1
fi
echo "rehearsal passed: $("$PY" -c 'import sys, torch; print("Python", sys.version.split()[0], "torch", torch.__version__)') with gpu_wheels/"
