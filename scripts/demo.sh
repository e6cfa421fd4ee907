#!/usr/bin/env bash
# Install clpt, then run SLCA on the built-in benchmark (no download, no GPU needed).
# The first run pre-trains the built-in backbone once (cached under ~/.cache/clpt).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
clpt run "${1:-runs/demo}"
