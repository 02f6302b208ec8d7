#!/usr/bin/env bash
# Prepare the Python packages a lent GPU machine lacks, as wheels it can install offline.
#
#   bash launch/build_gpu_wheels.sh                  # on a CPU machine with PyPI: fill gpu_wheels/
#   bash launch/build_gpu_wheels.sh --dry-run        # print what would run
#   bash launch/build_gpu_wheels.sh --compile [--toolchain DIR] [--selective-scan] [--out DIR]
#                                                    # with nvcc 13.0: compile causal-conv1d
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
# GPU image, or a machine with Python 3.12 + torch==2.11.0+cu130 + nvcc 13.0). The CPU machines
# here are such a machine: they have nvcc 13.0, and PyPI's torch 2.11.0 is the image's own
# build (+cu130), so `--compile --toolchain DIR` makes a Python 3.12 venv in DIR with it (4.6 GB,
# a minute from PyPI) and compiles there; the CUDA headers torch's own come from (cuBLAS,
# cuSPARSE: pip's nvidia packages) are put on CPATH. Measured on 2 cores (2026-12-04):
# causal-conv1d 7.5-9.5 minutes, a 10.5 MB wheel. A wheel already in the output folder is kept.
#   - causal-conv1d has no pure-Python form: three .cu files, compiled here for one
#     architecture (CUDA_ARCH, default 90 = H100/H200) by rewriting the -gencode list its
#     setup.py hard-codes (75, 80, 87, 90, 100, 120, 103, 110, 121 with CUDA 13;
#     TORCH_CUDA_ARCH_LIST does not restrict it). --selective-scan does the same for
#     mamba-ssm's selective_scan_cuda, trimmed to the kernels the mixers run (bf16 and float32
#     inputs, real weights: 4 of its 9 kernel files), giving a platform wheel that replaces the
#     pure-Python mamba-ssm one (2026-12-04, 2 cores: 3.5 minutes, 6.5 MB; untrimmed it would
#     not fit a run's carry beside the rest).
#   - On the H200 image (16 cores, 2026-12-04) causal-conv1d alone did not finish within 240 s
#     inside gpu_check, hence the CPU machine. It is optional: without it the mixers' "cuda"
#     path runs the short conv in pure PyTorch and the scans in mamba_ssm's Triton kernels.
#   - All of it, with the default mode's wheels: 50 MiB. `bash benchmarks/gpu_rehearsal.sh DIR`
#     then installs them as gpu_check.sh does beside the toolchain's torch, checks that every
#     kernel group imports, and runs each benchmark on the CPU (2026-12-04: passed, 2.7 min).
#
# flash-attn is left out: its source build takes far longer than a lease (tens of minutes to
# hours, even for one architecture) and nothing here needs it; teachers use torch's sdpa,
# whose flash kernels are built into torch.
#
# Knobs (environment): PYTHON (default python3; default mode needs torch importable, any
# build), MAMBA_SSM_VERSION, CAUSAL_CONV1D_VERSION, DEEPSPEED_VERSION, TRANSFORMERS_VERSION
# (default: the one PYTHON imports), CUDA_ARCH, MAX_JOBS, TORCH_VERSION (--toolchain's, 2.11.0),
# TOOLCHAIN_PYTHON (--toolchain's interpreter, default python3.12 or pyenv's 3.12).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
MAMBA_SSM_VERSION=${MAMBA_SSM_VERSION:-2.3.2.post1}
CAUSAL_CONV1D_VERSION=${CAUSAL_CONV1D_VERSION:-1.7.0}
DEEPSPEED_VERSION=${DEEPSPEED_VERSION:-0.19.8}
CUDA_ARCH=${CUDA_ARCH:-90}
TARGET_PYTHON=3.12  # the GPU image's
LIMIT_MIB=58        # of the 64 MiB a run carries; the rest is the repository (about 4 MB)
MODE=prepare OUT_DIR=gpu_wheels DRY=0 DEEPSPEED=1 SELECTIVE_SCAN=0 TOOLCHAIN=""
TORCH_VERSION=${TORCH_VERSION:-2.11.0}  # the GPU image's (PyPI's build of it is +cu130)

while [ $# -gt 0 ]; do
  case $1 in
    --compile) MODE=compile ;;
    --selective-scan) SELECTIVE_SCAN=1 ;;
    --no-deepspeed) DEEPSPEED=0 ;;
    --out) OUT_DIR=$2; shift ;;
    --toolchain) TOOLCHAIN=$2; shift ;;
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

# NOTE: the default mode builds mamba-ssm's wheel with $PY's own packages (no build isolation):
# its setup.py imports torch and wheel's bdist_wheel. Say so now, not after the downloads.
if [ "$MODE" = prepare ] && [ "$DRY" = 0 ] && ! "$PY" -c "import torch, wheel.bdist_wheel, packaging" 2>/dev/null; then
  echo "$PY lacks torch, wheel or packaging, which building mamba-ssm's wheel needs: run with PYTHON=.venv/bin/python" \
    "after .venv/bin/pip install wheel packaging" >&2
  exit 2
fi

# NOTE: before anything runs or is written: the toolchain's python would build as you, and one
# someone else made (a shared /tmp) could run anything.
if [ -n "$TOOLCHAIN" ] && [ -e "$TOOLCHAIN" ] && [ ! -O "$TOOLCHAIN" ]; then
  echo "--toolchain $TOOLCHAIN is not yours: give a folder you own (e.g. ~/.cache/cald_scale/cu312)" >&2
  exit 1
fi

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
# NOTE: --compress-mode=size (zstd) makes the device code about a fifth smaller than nvcc's
# default compression: causal-conv1d's sm_90 code alone is 26 MB, and a run carries 64 MiB.
text, m = re.subn(r"^(\s*)cc_flag = \[\]$", rf'\1cc_flag = ["-gencode", "arch=compute_{arch},code=sm_{arch}", "--compress-mode=size"]', text, count=1, flags=re.M)
if not n or m != 1:
    sys.exit(f"{path}: could not restrict the -gencode list ({n} flags, {m} cc_flag lines): setup.py changed?")
ast.parse(text)
open(path, "w").write(text)
print(f"{path}: {n // 2} hard-coded architectures replaced by sm_{arch}")
EOF
}

# trim_selective_scan DIR: mamba-ssm's selective_scan_cuda for what the mixers run only, bf16
# and float32 inputs with real weights: 4 of its 9 kernel files (fp16 and complex weights
# dropped from the dispatch, which then names them in its error), so that it fits a run's carry.
trim_selective_scan() {
  run "$PY" - "$1" <<'EOF'
import re, sys
from pathlib import Path
root = Path(sys.argv[1])
def sub(path, pattern, repl, count, flags=0):
    text, n = re.subn(pattern, repl, path.read_text(), flags=flags)
    if n != count:
        sys.exit(f"{path}: expected {count} matches of {pattern!r}, found {n}: mamba-ssm's sources changed?")
    path.write_text(text)
sub(root / "setup.py", r'^\s*"csrc/selective_scan/selective_scan_(fwd_fp16|bwd_fp16_real|bwd_\w+_complex)\.cu",\n', "", 5, re.M)
cpp = root / "csrc/selective_scan/selective_scan.cpp"
sub(cpp, r"if \(ITYPE == at::ScalarType::Half\) \{[^}]*\} else if \(ITYPE == at::ScalarType::BFloat16\)", "if (ITYPE == at::ScalarType::BFloat16)", 1)
sub(cpp, r"\} else if \(WTYPE == at::ScalarType::ComplexFloat\) \{[^}]*\} else \{", "} else {", 1)
for name in ("fwd_bf16", "fwd_fp32"):
    sub(root / f"csrc/selective_scan/selective_scan_{name}.cu", r"^template void \w+<[\w:]+, complex_t>.*\n?", "", 1, re.M)
print(f"{root}: selective_scan_cuda trimmed to bf16/float32 inputs with real weights")
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
  if [ -n "$TOOLCHAIN" ]; then
    if [ ! -x "$TOOLCHAIN/bin/python" ]; then
      py312=${TOOLCHAIN_PYTHON:-python3.12}
      "$py312" -c '' 2>/dev/null || py312=$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 2>/dev/null | tail -n 1)
      [ -n "$py312" ] || { echo "--toolchain needs Python $TARGET_PYTHON (set TOOLCHAIN_PYTHON)" >&2; exit 1; }
      run "$py312" -m venv "$TOOLCHAIN"
    fi
    run "$TOOLCHAIN/bin/python" -m pip install -q "torch==$TORCH_VERSION" setuptools wheel ninja packaging
    PY=$TOOLCHAIN/bin/python
  fi
  run "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
  [ "$DRY" = 1 ] || "$PY" -c "import sys, torch; sys.exit(sys.version_info[:2] != (3, 12) or torch.version.cuda is None)" || {
    echo "--compile: $PY must be Python $TARGET_PYTHON with a CUDA build of torch (the GPU image's), or use --toolchain DIR" >&2
    exit 1
  }
  # nvcc may be a wrapper script (the CPU machines' /usr/local/bin/nvcc): ask it for its toolkit.
  export CUDA_HOME=${CUDA_HOME:-$(realpath "$(nvcc -v -x cu -E /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)")}
  # NOTE: a CUDA toolkit without cuBLAS/cuSPARSE headers (the CPU machines') takes them from
  # the nvidia packages torch was installed with; ATen's CUDA headers include them.
  headers=$("$PY" -c 'import glob, nvidia; print(":".join(glob.glob(f"{list(nvidia.__path__)[0]}/cu*/include")))' 2>/dev/null || true)
  [ -n "$headers" ] && export CPATH="$headers${CPATH:+:$CPATH}"
  BUILD=$(mktemp -d)
  trap 'rm -rf "$BUILD"' EXIT
  export TORCH_CUDA_ARCH_LIST="${CUDA_ARCH:0:1}.${CUDA_ARCH:1}" MAX_JOBS=${MAX_JOBS:-$(nproc)}
  # NOTE: the host code's debug information (Python's own CFLAGS have -g) is a quarter of the
  # library: the linker drops it.
  export LDFLAGS="${LDFLAGS:+$LDFLAGS }-Wl,--strip-debug"
  have=$(ls "$OUT_DIR"/causal_conv1d-"$CAUSAL_CONV1D_VERSION"-*.whl 2>/dev/null || true)
  if [ -n "$have" ]; then
    echo "have $have"  # minutes of compiling: delete it to build again
  else
    run tar -xzf "$SRC/causal_conv1d-$CAUSAL_CONV1D_VERSION.tar.gz" -C "$BUILD"
    patch_arch "$BUILD/causal_conv1d-$CAUSAL_CONV1D_VERSION"
    CAUSAL_CONV1D_FORCE_BUILD=TRUE \
      run "$PY" -m pip wheel --no-deps --no-build-isolation --no-index -w "$OUT_DIR" "$BUILD/causal_conv1d-$CAUSAL_CONV1D_VERSION"
  fi
  if [ "$SELECTIVE_SCAN" = 1 ]; then
    run tar -xzf "$SRC/mamba_ssm-$MAMBA_SSM_VERSION.tar.gz" -C "$BUILD"
    patch_arch "$BUILD/mamba_ssm-$MAMBA_SSM_VERSION"
    trim_selective_scan "$BUILD/mamba_ssm-$MAMBA_SSM_VERSION"
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
