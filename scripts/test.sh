#!/usr/bin/env bash
# Install clpt (if needed), lint with ruff, type-check with mypy, run the test suite.
# Development: `python -m pytest -m "not slow"` is the fast tier (unit tests, under a minute).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
PY="${PYTHON:-python3}"
"$PY" -m ruff check .
"$PY" -m mypy
"$PY" -m pytest -q "$@"
