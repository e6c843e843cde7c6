#!/usr/bin/env bash
# Create .venv and install FunGPT into it.   Usage: bash scripts/setup.sh [test]
#   test: also install the test extras (pytest, ruff, transformers, tiktoken, tensorboard).
# Torch is installed first and on its own. With an NVIDIA GPU: PyPI's build (CUDA). Without one, on Linux:
# the CPU build (2.13.0+cpu) from PyTorch's own index, added to the usual one: PyPI's Linux wheel is the
# CUDA build, with several GB of NVIDIA libraries a CPU cannot use. Where PyTorch's index cannot be reached
# (the probe honours the https_proxy variable, not pip.conf), and on macOS and Windows, whose PyPI wheels
# are CPU builds: torch==2.13.0 from the usual index, which on Linux is the CPU build only if that index
# (a local mirror) serves it; the line printed at the end says which build was installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
CPU_INDEX=https://download.pytorch.org/whl/cpu
reachable() { .venv/bin/python -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)" "$1" \
  >/dev/null 2>&1; }
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    pip install torch
  elif [ "$(uname -s)" = Linux ] && reachable "$CPU_INDEX/torch/"; then
    pip install torch==2.13.0 --extra-index-url "$CPU_INDEX"  # 2.13.0+cpu ranks above 2.13.0 (PEP 440)
  else
    pip install torch==2.13.0
  fi
  new_torch=1
fi
if [ "${1:-}" = "test" ]; then pip install -e ".[test]"; else pip install -e .; fi
if [ -n "${new_torch:-}" ]; then  # (after numpy is installed: torch warns when it imports without it)
  .venv/bin/python -c "import torch; print('setup: installed torch', torch.__version__, '(CUDA build)' if torch.version.cuda else '(with Apple GPU support: mps)' if torch.backends.mps.is_built() else '(CPU build)')"
fi
