#!/usr/bin/env bash
# Install clpt (if needed), lint with ruff, run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
PY="${PYTHON:-python3}"
"$PY" -m ruff check .
"$PY" -m pytest -q "$@"
