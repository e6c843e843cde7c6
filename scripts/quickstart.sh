#!/usr/bin/env bash
# Set up, train the default character-level Shakespeare model on the CPU, and sample from it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Offline machines: use a local copy of Tiny Shakespeare when one sits in ../shared/data.
if [ -z "${FUNGPT_DATA_DIR:-}" ] && [ -f ../shared/data/tinyshakespeare.txt ]; then
  export FUNGPT_DATA_DIR=$(cd ../shared/data && pwd)
fi
.venv/bin/fungpt train --config configs/shakespeare-char-cpu.toml --overwrite
.venv/bin/fungpt sample --run out/shakespeare-char-cpu --prompt "ROMEO:" --max-new-tokens 400
