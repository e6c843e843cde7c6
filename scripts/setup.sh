#!/usr/bin/env bash
# Create .venv and install FunGPT into it.   Usage: bash scripts/setup.sh [test]
#   test: also install the test extras (pytest, ruff, transformers, tiktoken, tensorboard).
# Torch is installed first and on its own: without a GPU, `torch==2.13.0` is the CPU build
# (an unpinned `torch` on Linux pulls a multi-GB CUDA build that a CPU cannot use).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then pip install torch; else pip install torch==2.13.0; fi
fi
if [ "${1:-}" = "test" ]; then pip install -e ".[test]"; else pip install -e .; fi
