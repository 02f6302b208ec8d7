#!/usr/bin/env bash
# Prepare the Python packages a lent GPU machine lacks, as wheels it can install offline.
#
#   bash launch/build_gpu_wheels.sh                  # on a CPU machine with PyPI: fill gpu_wheels/
#   bash launch/build_gpu_wheels.sh --dry-run        # print what would run
#   bash launch/build_gpu_wheels.sh --compile [--selective-scan] [--out DIR]
#                                                    # where nvcc and the target torch are: compile
#
# The GPU machines (see /work/shared/METHOD.md, "Facts about the lent GPU machines") run
# Python 3.12, torch 2.11.0+cu130, triton 3.6, transformers, einops, ninja, nvcc 13.0; they
# cannot reach a registry and take at most 64 MiB of files per run. benchmarks/gpu_check.sh
# installs every gpu_wheels/*.whl with `pip install --no-deps --no-index --target`; the device
# tool's `carry` must name gpu_wheels (the folder ignores itself in git).
#
# Default mode (CPU machine, PyPI, about a minute, about 34 MB):
#   - mamba-ssm 2.3.2.post1 is published as a source archive only. Built with
#     MAMBA_SKIP_CUDA_BUILD=TRUE (no extension) and MAMBA_FORCE_BUILD=TRUE (else its setup.py
#     first tries to fetch a prebuilt wheel from GitHub), it becomes a pure-Python wheel of
#     0.2 MB. Its Triton kernels (SSD scan mamba_chunk_scan_combined, selective_state_update)
#     then need no compilation; cald_scale.mixers.ops._cuda imports them without the package
#     root, which wants the compiled Mamba-1 extension selective_scan_cuda.
#   - deepspeed (pure Python with DS_BUILD_OPS=0) and the packages it needs that the image
#     lacks (hjson, pydantic, pydantic-core, annotated-types, typing-inspection, and a
#     typing-extensions new enough for that pydantic): only the
#     distributed training entry point needs them; --no-deepspeed leaves them out.
#   - transformers at the version installed here (TRANSFORMERS_VERSION; pyproject's tested
#     range starts at 5.24, the image holds 5.17) with everything it needs except numpy: its
#     huggingface-hub 2.x brings new packages (httpx2, hf-xet) and 5.25 needs kernels. About
#     34 MB; gpu_check.sh puts them ahead of the image's own packages.
#   - the sdists of causal-conv1d 1.7.0 and mamba-ssm, kept in gpu_wheels/src for --compile.
#
# --compile mode (needs nvcc and the very torch and Python that will run the kernels, i.e. the
# GPU image, or a machine with Python 3.12 + torch==2.11.0+cu130 + nvcc 13.0):
#   - causal-conv1d has no pure-Python form: three .cu files, compiled here for one
#     architecture (CUDA_ARCH, default 90 = H100/H200) by rewriting the -gencode list its
#     setup.py hard-codes (75, 80, 87, 90, 100, 120, 103, 110, 121 with CUDA 13;
#     TORCH_CUDA_ARCH_LIST does not restrict it). --selective-scan does the same for
#     mamba-ssm's selective_scan_cuda (ten .cu files, several times longer), giving a platform
#     wheel that replaces the pure-Python mamba-ssm one.
#   - Measured on the H200 image (16 cores, 2026-12-04): causal-conv1d alone did not finish
#     within 240 s. So it runs as a device call of its own, `--compile --out $OUT` with the
#     longest timeout a lease allows, which brings the wheel back (at most 16 MiB a file) to
#     be kept in gpu_wheels/ from then on. It is optional: without it the mixers' "cuda" path
#     runs the short conv in pure PyTorch and the scans in mamba_ssm's Triton kernels.
#
# flash-attn is left out: its source build takes far longer than a lease (tens of minutes to
# hours, even for one architecture) and nothing here needs it; teachers use torch's sdpa,
# whose flash kernels are built into torch.
#
# Knobs (environment): PYTHON (default python3; default mode needs torch importable, any
# build), MAMBA_SSM_VERSION, CAUSAL_CONV1D_VERSION, DEEPSPEED_VERSION, TRANSFORMERS_VERSION
# (default: the one PYTHON imports), CUDA_ARCH, MAX_JOBS.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
MAMBA_SSM_VERSION=${MAMBA_SSM_VERSION:-2.3.2.post1}
CAUSAL_CONV1D_VERSION=${CAUSAL_CONV1D_VERSION:-1.7.0}
DEEPSPEED_VERSION=${DEEPSPEED_VERSION:-0.19.8}
CUDA_ARCH=${CUDA_ARCH:-90}
TARGET_PYTHON=3.12  # the GPU image's
LIMIT_MIB=48        # of the 64 MiB a run carries; the rest is the repository
MODE=prepare OUT_DIR=gpu_wheels DRY=0 DEEPSPEED=1 SELECTIVE_SCAN=0

while [ $# -gt 0 ]; do
  case $1 in
    --compile) MODE=compile ;;
    --selective-scan) SELECTIVE_SCAN=1 ;;
    --no-deepspeed) DEEPSPEED=0 ;;
    --out) OUT_DIR=$2; shift ;;
    --dry-run) DRY=1 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

run() {
  echo "+ $*"
  [ "$DRY" = 1 ] || "$@"
}

SRC=gpu_wheels/src
run mkdir -p "$OUT_DIR" "$SRC"
# NOTE: the folder ignores itself, so wheels never reach a commit; name it in `carry`.
[ "$DRY" = 1 ] || { [ -f gpu_wheels/.gitignore ] || echo '*' >gpu_wheels/.gitignore; }

# pip download with the GPU image's interpreter and platform tags (binary wheels only);
# --with-deps: every requirement too, resolved for that interpreter and platform.
download_for_gpu() {
  local deps=(--no-deps)
  if [ "$1" = --with-deps ]; then
    deps=()
    shift
  fi
  run "$PY" -m pip download -q "${deps[@]}" --only-binary=:all: --python-version "$TARGET_PYTHON" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$OUT_DIR" "$@"
}

sdist() {  # sdist NAME VERSION: the source archive into $SRC (pip would build its metadata: skip that)
  local name=$1 version=$2 file
  file=$(ls "$SRC"/"${name//-/_}"-"$version".tar.gz 2>/dev/null || true)
  if [ -n "$file" ]; then
    echo "have $file"
    return
  fi
  # NOTE: pip prepares an sdist's metadata by running its setup.py, which imports torch and
  # fails inside build isolation; without isolation and with the skip flags it is harmless.
  MAMBA_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE \
    run "$PY" -m pip download -q --no-deps --no-binary :all: --no-build-isolation -d "$SRC" "$name==$version"
}

# patch_arch DIR: make DIR/setup.py compile for $CUDA_ARCH only.
patch_arch() {
  run "$PY" - "$1/setup.py" "$CUDA_ARCH" <<'EOF'
import ast, re, sys
path, arch = sys.argv[1], sys.argv[2]
text = open(path).read()
# Every hard-coded -gencode pair becomes a no-op; one pair for the wanted arch follows `cc_flag = []`.
text, n = re.subn(r'cc_flag\.append\("(-gencode|arch=compute_\d+a?,code=sm_\d+a?)"\)', "pass", text)
text, m = re.subn(r"^(\s*)cc_flag = \[\]$", rf'\1cc_flag = ["-gencode", "arch=compute_{arch},code=sm_{arch}"]', text, count=1, flags=re.M)
if not n or m != 1:
    sys.exit(f"{path}: could not restrict the -gencode list ({n} flags, {m} cc_flag lines): setup.py changed?")
ast.parse(text)
open(path, "w").write(text)
print(f"{path}: {n // 2} hard-coded architectures replaced by sm_{arch}")
EOF
}

if [ "$MODE" = prepare ]; then
  sdist mamba-ssm "$MAMBA_SSM_VERSION"
  sdist causal-conv1d "$CAUSAL_CONV1D_VERSION"
  # 1. mamba-ssm without its extension: a pure-Python wheel (Triton kernels only).
  MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE \
    run "$PY" -m pip wheel -q --no-deps --no-build-isolation --no-index -w "$OUT_DIR" "$SRC/mamba_ssm-$MAMBA_SSM_VERSION.tar.gz"
  # 2. deepspeed (pure Python without prebuilt ops) and what the image lacks of its requirements.
  if [ "$DEEPSPEED" = 1 ]; then
    DS_BUILD_OPS=0 run "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT_DIR" "deepspeed==$DEEPSPEED_VERSION"
    # pydantic and pydantic-core must match each other: take the pair pydantic itself pins.
    download_for_gpu pydantic hjson annotated-types typing-inspection typing-extensions
    if [ "$DRY" = 0 ]; then
      core=$(unzip -p "$OUT_DIR"/pydantic-2*.whl '*/METADATA' | sed -n 's/^Requires-Dist: pydantic-core==\([0-9.]*\).*/\1/p' | head -n 1)
      download_for_gpu "pydantic-core==${core:?could not read the pydantic-core pin}"
    fi
  fi
  # 3. transformers as tested here (the image's 5.17 is older than pyproject's range), with its
  #    requirements; numpy stays the image's (16 MB, and any version transformers accepts).
  TRANSFORMERS_VERSION=${TRANSFORMERS_VERSION:-$("$PY" -c 'import importlib.metadata as m; print(m.version("transformers"))' 2>/dev/null || true)}
  download_for_gpu --with-deps "transformers==${TRANSFORMERS_VERSION:?PYTHON has no transformers: set TRANSFORMERS_VERSION}"
  run rm -f "$OUT_DIR"/numpy-*.whl
else
  # 3. Compile for one architecture, here (nvcc and the target torch needed).
  command -v nvcc >/dev/null || { echo "--compile needs nvcc" >&2; exit 1; }
  run "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
  BUILD=$(mktemp -d)
  trap 'rm -rf "$BUILD"' EXIT
  export TORCH_CUDA_ARCH_LIST="${CUDA_ARCH:0:1}.${CUDA_ARCH:1}" MAX_JOBS=${MAX_JOBS:-$(nproc)}
  run tar -xzf "$SRC/causal_conv1d-$CAUSAL_CONV1D_VERSION.tar.gz" -C "$BUILD"
  patch_arch "$BUILD/causal_conv1d-$CAUSAL_CONV1D_VERSION"
  CAUSAL_CONV1D_FORCE_BUILD=TRUE \
    run "$PY" -m pip wheel --no-deps --no-build-isolation --no-index -w "$OUT_DIR" "$BUILD/causal_conv1d-$CAUSAL_CONV1D_VERSION"
  if [ "$SELECTIVE_SCAN" = 1 ]; then
    run tar -xzf "$SRC/mamba_ssm-$MAMBA_SSM_VERSION.tar.gz" -C "$BUILD"
    patch_arch "$BUILD/mamba_ssm-$MAMBA_SSM_VERSION"
    MAMBA_FORCE_BUILD=TRUE \
      run "$PY" -m pip wheel --no-deps --no-build-isolation --no-index -w "$OUT_DIR" "$BUILD/mamba_ssm-$MAMBA_SSM_VERSION"
    # One mamba-ssm only: two versions of a package stop the whole offline install.
    run rm -f "$OUT_DIR"/mamba_ssm-*-py3-none-any.whl gpu_wheels/mamba_ssm-*-py3-none-any.whl
  fi
fi

[ "$DRY" = 1 ] && exit 0
echo "wheels in $OUT_DIR:"
ls -la "$OUT_DIR"
total=$(du -cm "$OUT_DIR"/*.whl | tail -n 1 | cut -f1)
if [ "$OUT_DIR" = gpu_wheels ] && [ "$total" -gt "$LIMIT_MIB" ]; then
  echo "gpu_wheels holds ${total} MiB of wheels, over the ${LIMIT_MIB} MiB left for them of a run's 64 MiB" >&2
  exit 1
fi
echo "${total} MiB of wheels (limit ${LIMIT_MIB}); carry gpu_wheels when calling benchmarks/gpu_check.sh"
