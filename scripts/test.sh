#!/usr/bin/env bash
# Set up (with the test extras) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
if [ -z "${FUNGPT_DATA_DIR:-}" ] && [ -f ../shared/data/tinyshakespeare.txt ]; then
  export FUNGPT_DATA_DIR=$(cd ../shared/data && pwd)
fi
.venv/bin/python -m pytest "$@"
