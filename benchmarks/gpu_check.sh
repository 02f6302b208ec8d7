#!/usr/bin/env bash
# The one prepared script for a lent GPU (docs/benchmarks.md, "On a GPU"): environment, carried kernel
# wheels, kernel-path parity against a float64 oracle, then GPU speed of the mixers, of
# inference and of training, every result under $OUT with the device named in it.
#
#   GPU_CHECK_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_check.sh
#                                           # through the device tool: carry ["gpu_wheels"], timeout_s 520,
#                                           # kind nvidia-h200 (the earlier runs' card; an H100 works too)
#   GPU_CHECK_LIMIT_S=300 GPU_CHECK_STEPS="train_speed_llama1b" GPU_CHECK_COMMIT=... bash benchmarks/gpu_check.sh
#                                           # a second call: the budget follows the call's timeout_s (less 40 s)
#   bash benchmarks/gpu_rehearsal.sh        # before it, on the CPU machine: the image's software, every benchmark on CPU
#
# Time: the whole script stays under 8 minutes. Each step runs under `timeout` with its own
# cap, cut to what is left of GPU_CHECK_BUDGET_S (default: GPU_CHECK_LIMIT_S, the device
# call's timeout_s, less 40 s; 480 s for the usual 520); a step that fails or times out is
# recorded and the next one runs (set -uo pipefail, no -e); the script exits 1 when any did.
# A SIGTERM or SIGINT to the script (the device call's own limit) stops the running step and
# keeps what every step wrote, with the status table. train_speed writes its result after
# every timed round, kernel_parity after every op. The steps run in the
# order of their worth: kernel parity (bf16, then float32), the distillation step, mixer and
# inference speed, Llama-3.2-1B's training speed. On the second GPU run (2026-12-04) all of
# them needed about 12 minutes, over half of it Triton tuning and processes starting one after
# another. On the third (2026-12-04, shared tuning choices, parallel start) every step but
# float32 parity finished in 481 s with the budget at 480, parity cut at its 150 s cap by the
# `small` shape's tuning (benchmarks/results/gpu_h200_2026-12-04_third/). A second call with
# GPU_CHECK_STEPS runs what a first one's budget cut; Triton's choices are now saved when a cap
# ends a step (SIGTERM), so that call continues the tuning instead of starting it over. Since
# then both parity dtypes run untuned in one step up front, under a budget of their own.
#
# Wheels: gpu_wheels/ at the repo root (GPU_WHEELS overrides), made on a CPU machine by
# launch/build_gpu_wheels.sh; the folder ignores itself in git, so the device tool's `carry`
# must name it. Every *.whl there is installed with --no-deps --no-index into a scratch
# folder put first on PYTHONPATH. Without wheels the CUDA runs use the pure-PyTorch paths
# on the GPU, and kernel_parity.json says what it skipped and why. causal-conv1d is optional
# (without it the mixers' "cuda" path runs its conv in pure PyTorch); it has no pure-Python
# build, and compiling it for sm_90 did not finish in 240 s on a 16-core H200 host (first GPU
# run, 2026-12-04), so its wheel is compiled on the CPU machine, which has nvcc 13.0, beside
# PyPI's torch 2.11.0+cu130 (`launch/build_gpu_wheels.sh --compile --selective-scan --toolchain
# DIR`: 13 minutes on 2 cores), and so is Mamba-1's selective_scan_cuda, trimmed to bf16 and
# float32 to fit the carry.
#
# Triton tuning: mamba_ssm's SSD kernels are tuned once per process and tuning key; most of the
# backward ones escape Triton's own disk cache (pre_hook configs), which cost 20-90 s in every
# process of the second GPU run. CALD_TRITON_AUTOTUNE_CACHE (cald_scale/mixers/ops/
# _autotune_cache.py) keeps the choices in one file that every step reads and adds to; it starts
# from benchmarks/results/triton_autotune.json (committed from the last GPU run, keyed by the
# device and the versions) and comes back in the tarball as triton_autotune.json, to be
# committed for the next run.
#
# Outputs in $OUT (at most 8 files come back from it): gpu_check.log (every step's output
# in order, then a status table), kernel_parity.json (bf16 and float32), mixer_speed_gpu.json,
# inference_speed_gpu_{smollm2,llama1b}.json, train_speed_gpu_{smollm2,llama1b}.json, and
# gpu_check_all.tar.gz (each step's log and the other files the steps wrote: reports, plots).
# The device copy of the repo carries a stale .git, so the caller names the commit
# (GPU_CHECK_COMMIT); without it the log says what git says, marked unchecked. Without $OUT (run by hand) they go to
# benchmarks/results/gpu_check_<UTC time>/.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
REPO=$PWD
OUT=${OUT:-$REPO/benchmarks/results/gpu_check_$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT  # logs and results are packed into $OUT after every step
SITE=$WORK/site
LOG=$OUT/gpu_check.log
LIMIT=${GPU_CHECK_LIMIT_S:-520}
BUDGET=${GPU_CHECK_BUDGET_S:-$((LIMIT - 40))}
if ((BUDGET > LIMIT - 40)); then
  echo "gpu_check: GPU_CHECK_BUDGET_S=$BUDGET does not end 40 s before the call's limit GPU_CHECK_LIMIT_S=$LIMIT: the results would be lost" >&2
  exit 2
fi
# A rerun of some steps only (env, install_wheels and kernels always run), e.g.
# GPU_CHECK_STEPS="train_speed_smollm2 kernel_parity" GPU_CHECK_PARITY_LEVELS=mixer
STEPS="env install_wheels kernels kernel_parity train_speed_smollm2 mixer_speed inference_speed_smollm2 inference_speed_hybrid inference_speed_llama1b train_speed_llama1b"
ONLY=${GPU_CHECK_STEPS:-}
for name in $ONLY; do
  if [[ " $STEPS none " != *" $name "* ]]; then
    echo "gpu_check: GPU_CHECK_STEPS names $name, which is no step of this script (steps: $STEPS)" >&2
    exit 2
  fi
done
[ -n "$ONLY" ] && ONLY="env install_wheels kernels $ONLY"
PARITY_LEVELS=${GPU_CHECK_PARITY_LEVELS:-op,mixer}
WHEELS=${GPU_WHEELS:-$REPO/gpu_wheels}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline
# NOTE: mamba_ssm's Triton SSD kernels autotune per shape and dtype (many configs compiled on
# first use); cached on disk, the tuning of one step serves the later ones.
export TRITON_CACHE_AUTOTUNING=1
export CALD_TRITON_AUTOTUNE_CACHE=$WORK/triton_autotune.json  # packed with the logs
[ -f "$REPO/benchmarks/results/triton_autotune.json" ] && cp "$REPO/benchmarks/results/triton_autotune.json" "$CALD_TRITON_AUTOTUNE_CACHE"
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
export CALD_SCALE_CACHE=$WORK/cache  # random teachers written by train_speed.py stay out of $HOME
export PY WHEELS WORK SITE  # read by the step functions, which run in child shells
# GPU_CHECK_PARSE_ONLY=1: every benchmark step checks its command line as given here and runs
# nothing (benchmarks/_common.py PARSE_ONLY): the CI test of this script, on CPU.
[ "${GPU_CHECK_PARSE_ONLY:-0}" = 1 ] && export CALD_BENCH_PARSE_ONLY=1
START=$SECONDS
STATUS=()
RESULTS=()  # the result files the steps so far write (copied into $OUT)
FAILED=0

say() { echo "$*" | tee -a "$LOG"; }

# budget_for CAP_S: seconds a script may plan for inside a step of cap CAP_S, 25 s short of
# the step's limit (the cap or what is left of the budget), so that it writes its result first.
budget_for() {
  local left=$((BUDGET - (SECONDS - START)))
  echo $(( (left < $1 ? left : $1) - 25 ))
}

pack() {  # everything the steps wrote, for the record (a tarball is one of the 8 files)
  tar -czf "$OUT/gpu_check_all.tar.gz.tmp" -C "$WORK" --exclude=./site --exclude=./cache . 2>/dev/null \
    && mv "$OUT/gpu_check_all.tar.gz.tmp" "$OUT/gpu_check_all.tar.gz"
}

# keep: every result file the steps wrote, into $OUT (at most 8 files come back from it).
keep() {
  local result
  for result in "${RESULTS[@]}"; do
    [ -s "$WORK/$result" ] && cp "$WORK/$result" "$OUT/$result"
  done
}

status_table() {
  say ""
  say "gpu_check $1 in $((SECONDS - START)) s (budget ${BUDGET}s); results in $OUT:"
  for line in "${STATUS[@]}"; do say "  $line"; done
}

# The device call's limit ends the script with a SIGTERM: stop the running step (its `timeout`
# passes the signal on, and the benchmarks save what they have) and keep what was written.
on_signal() {
  trap - TERM INT
  [ -s "$WORK/step.pid" ] && kill -TERM "$(cat "$WORK/step.pid")" 2>/dev/null
  sleep 2
  STATUS+=("$(printf '%-26s stopped by a signal' "${CURRENT:-?}")")
  keep
  status_table "stopped by a signal"
  pack
  exit 143
}
trap on_signal TERM INT

# step NAME CAP_S RESULT CMD...: run CMD under timeout, its output to $WORK/NAME.log and the
# combined log; RESULT (a file name written in $WORK, or -) is copied into $OUT afterwards.
step() {
  local name=$1 cap=$2 result=$3
  shift 3
  if [ -n "$ONLY" ] && [[ " $ONLY " != *" $name "* ]]; then
    STATUS+=("$(printf '%-26s not asked for (GPU_CHECK_STEPS)' "$name")")
    return
  fi
  local left=$((BUDGET - (SECONDS - START)))
  local limit=$((cap < left ? cap : left))
  if ((limit < 20)); then
    say "== $name: skipped, $left s of the budget left"
    STATUS+=("$(printf '%-26s skipped (budget spent)' "$name")")
    return
  fi
  say "== $name (timeout ${limit}s, $(date -u +%H:%M:%S)): $*"
  if declare -F "$1" >/dev/null; then  # a function of this script: `timeout` runs programs only
    set -- bash -c "$(declare -f "$1"); $1"
  fi
  local t0=$SECONDS
  CURRENT=$name
  [ "$result" != "-" ] && RESULTS+=("$result")
  rm -f "$WORK/step.rc" "$WORK/step.pid"
  # NOTE: in the background, waited for: a signal to this script runs its trap at once, not
  # after the step. The step's exit code and its `timeout`'s pid come back through files.
  {
    timeout --kill-after=10 "$limit" "$@" &
    echo $! >"$WORK/step.pid"
    wait $!
    echo $? >"$WORK/step.rc"
  } 2>&1 | tee "$WORK/$name.log" >>"$LOG" &
  wait $!
  local rc
  rc=$(cat "$WORK/step.rc" 2>/dev/null || echo "?")
  LAST_RC=$rc
  local took=$((SECONDS - t0)) note=""
  [[ "$rc" == 124 || "$rc" == 137 ]] && note=" TIMED OUT"
  if [ "$result" != "-" ]; then
    if [ -s "$WORK/$result" ]; then
      cp "$WORK/$result" "$OUT/$result"
    elif [ -z "${CALD_BENCH_PARSE_ONLY:-}" ]; then
      note="$note, no $result"
      FAILED=1
    fi
  fi
  [ "$rc" != 0 ] && FAILED=1
  tail -n 12 "$WORK/$name.log"
  STATUS+=("$(printf '%-26s rc=%-3s %4ss%s' "$name" "$rc" "$took" "$note")")
  CURRENT=
  pack
}

env_info() {
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  nvidia-smi
  nvcc --version | tail -n 2
  "$PY" - <<'EOF'
import importlib.metadata as md, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| cudnn", torch.backends.cudnn.version())
print("device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO CUDA DEVICE",
      "| capability", torch.cuda.get_device_capability(0) if torch.cuda.is_available() else None)
for pkg in ("triton", "transformers", "accelerate", "einops", "deepspeed", "mamba_ssm", "causal_conv1d", "flash_attn"):
    try:
        print(f"  {pkg:14s} {md.version(pkg)}")
    except md.PackageNotFoundError:
        print(f"  {pkg:14s} not installed")
EOF
  echo "wheels in $WHEELS:"
  ls -la "$WHEELS" 2>/dev/null || echo "  (none: carry gpu_wheels, made by launch/build_gpu_wheels.sh)"
}

install_wheels() {
  shopt -s nullglob
  local wheels=("$WHEELS"/*.whl)
  shopt -u nullglob
  if ((${#wheels[@]} == 0)); then
    echo "no wheels to install in $WHEELS: carry gpu_wheels (launch/build_gpu_wheels.sh makes them)"
    [ -n "${CALD_BENCH_PARSE_ONLY:-}" ]  # a failure, but in the CPU check of the command lines
    return $?
  fi
  local pip=("$PY" -m pip install -q --no-deps --no-index --no-compile --no-cache-dir --upgrade --target "$SITE")
  "${pip[@]}" "${wheels[@]}" && return 0
  # NOTE: one wheel pip refuses (another Python, platform) fails the whole batch: then one by one.
  local failed=0 wheel
  for wheel in "${wheels[@]}"; do
    "${pip[@]}" "$wheel" || { echo "NOT INSTALLED: $wheel"; failed=1; }
  done
  return $failed
}

kernel_info() {
  "$PY" - <<'EOF'
import json
import os
import transformers  # the carried wheel (pyproject's range), not the image's older one
print("transformers in use:", transformers.__version__, "from", transformers.__file__)
from cald_scale.mixers.ops import _cuda
from cald_scale.mixers.ops.dispatch import resolve_kernel
print(json.dumps({g: {"importable": ok, "reason": why} for g, (ok, why) in _cuda.kernel_groups().items()}, indent=1))
for kind in ("mamba2", "mamba"):
    print(kind, "kernels importable:", _cuda.kernels_available(kind))
missing = []
try:
    print("mixer kernel='cuda' resolves to", resolve_kernel("cuda", "cuda"))
except RuntimeError as err:
    print("mixer kernel='cuda' unavailable:", err)
    missing.append("the mixer kernels")
try:
    import deepspeed
    print("deepspeed in use:", deepspeed.__version__)
except ImportError as err:
    missing.append(f"deepspeed ({err})")
if missing and not os.environ.get("CALD_BENCH_PARSE_ONLY"):  # the later steps would time pure PyTorch, or fail
    raise SystemExit(f"kernels step FAILED: {', '.join(missing)} not importable")
EOF
}

COMMIT=${GPU_CHECK_COMMIT:-"$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?') (git here; unchecked: set GPU_CHECK_COMMIT)"}
say "gpu_check: $(date -u +%Y-%m-%dT%H:%M:%SZ), repo $COMMIT, budget ${BUDGET}s, out $OUT"
step env 25 - env_info
step install_wheels 90 - install_wheels  # ~35 wheels, transformers among them
if [ -d "$SITE" ]; then
  export PYTHONPATH=$SITE:$PYTHONPATH PATH=$SITE/bin:$PATH
fi
step kernels 25 - kernel_info
# Without the kernels (no wheels carried, one that does not import) the rest would only time the
# pure-PyTorch paths: stop here and keep the GPU's minutes. GPU_CHECK_ALLOW_PURE=1 goes on anyway.
if [ -z "${CALD_BENCH_PARSE_ONLY:-}" ] && [ "${GPU_CHECK_ALLOW_PURE:-0}" != 1 ] && [ "${LAST_RC:-0}" != 0 ]; then
  say "gpu_check: the kernels step failed (its log above): stopping before the benchmarks; GPU_CHECK_ALLOW_PURE=1 runs them anyway"
  trap - TERM INT
  status_table "stopped: no kernels"
  pack
  exit 1
fi
# NOTE: each Triton kernel's smallest config, untuned (CALD_TRITON_UNTUNED=1): any config computes
# the same function, and the bf16 checks of the tuned configs passed on the third run (29/29 ops,
# 132 mixer checks). Tuned, the SSD scan alone took 75-90 s per dtype, the `small` shape's tuning
# outlasted a 150 s cap, and float32 parity (run last then) never finished in two tries. bf16
# first, then float32, in one process; the JSON is rewritten after every op, so a cap keeps what ran.
step kernel_parity 180 kernel_parity.json \
  env CALD_TRITON_UNTUNED=1 "$PY" benchmarks/kernel_parity.py --device cuda --shapes smollm2,small --dtypes bfloat16,float32 --levels "$PARITY_LEVELS" \
  --time-budget "$(budget_for 180)" --out "$WORK/kernel_parity.json"
# NOTE: on the second GPU run the four items took 73 s to start one after another (about 10 s
# of imports each; now they start at once, train_speed's default on cuda) and their first steps
# 60 s (34 s for the student, 22 s for the distillation step: Triton tuning, which the choices
# file now shares with kernel_parity's), so a 150 s cap left one round. train_speed stops
# starting rounds 25 s before the cap so that it writes what it timed.
step train_speed_smollm2 210 train_speed_gpu_smollm2.json \
  "$PY" benchmarks/train_speed.py --device cuda --dtype bfloat16 --geometry SmolLM2-135M --compare-leaves --compare-zero3 --time-budget "$(budget_for 210)" \
  --log-dir "$WORK/train_speed_smollm2_items" --out "$WORK/train_speed_gpu_smollm2.json"
step mixer_speed 60 mixer_speed_gpu.json \
  "$PY" benchmarks/mixer_speed.py --device cuda --dtype bfloat16 --repeats 3 --no-report --out "$WORK/mixer_speed_gpu.json"
for tag in smollm2 llama1b; do
  geometry=$([ "$tag" = smollm2 ] && echo SmolLM2-135M || echo Llama-3.2-1B)
  step "inference_speed_$tag" 90 "inference_speed_gpu_$tag.json" \
    "$PY" benchmarks/inference_speed.py --device cuda --dtype bfloat16 --geometry "$geometry" --out "$WORK/inference_speed_gpu_$tag.json"
  if [ "$tag" = smollm2 ]; then
    # The default job's 25% attention hybrid, its decode replayed as a CUDA graph over the kept layers'
    # preallocated KV cache (checked against eager, first run on a GPU): at 2k only, no best batch. Its
    # JSON goes in the tarball (8 files come back, all taken).
    step inference_speed_hybrid 60 - \
      "$PY" benchmarks/inference_speed.py --device cuda --dtype bfloat16 --geometry SmolLM2-135M --attention_every 4 \
      --contexts 2048 --batches 1,8 --best_batch off --graph-decode on --out "$WORK/inference_speed_gpu_hybrid.json"
  fi
done
# NOTE: the 1B geometry at 4 x 2048 tokens, a GPU's smallest usual batch: at 1 x 512 (third run) every
# item was bound by the host's per-module work, which says little about a real conversion's cost.
# The four items' processes stay resident together: their peaks at 4 x 2048 summed to 108 GB on the
# H200 (call 2), over an H100's 80, so a card under 100 GB runs 2 x 2048.
GPU_MIB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -n 1)
LLAMA1B_BATCH=$([ "${GPU_MIB:-0}" -ge 100000 ] 2>/dev/null && echo 4 || echo 2)
step train_speed_llama1b 210 train_speed_gpu_llama1b.json \
  "$PY" benchmarks/train_speed.py --device cuda --dtype bfloat16 --geometry Llama-3.2-1B --batch "$LLAMA1B_BATCH" --seq_len 2048 --time-budget "$(budget_for 210)" \
  --log-dir "$WORK/train_speed_llama1b_items" --out "$WORK/train_speed_gpu_llama1b.json"

trap - TERM INT
status_table "done"
pack
ls -la "$OUT" | tee -a "$LOG"
exit $FAILED
