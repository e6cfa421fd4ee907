#!/usr/bin/env bash
# Install clpt (editable) and its dependencies into the current Python environment.
#
# torch: a torch that is already importable (e.g. a CUDA build on a GPU machine)
# is never replaced. Only when there is none do we install the CPU-usable pair
# torch 2.14.1 + torchvision 0.29.1; when torch is there but torchvision is not,
# we add the torchvision release that matches the installed torch, without deps.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"

if ! "$PY" -c "import torch" 2>/dev/null; then
    echo "[install] no torch found: installing torch==2.14.1 torchvision==0.29.1" >&2
    "$PY" -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
elif ! "$PY" -c "import torchvision" 2>/dev/null; then
    tv=$("$PY" -c "import torch; a, b = torch.__version__.split('+')[0].split('.')[:2]; print(f'0.{int(b) + 15}.*')")
    echo "[install] torch $("$PY" -c 'import torch; print(torch.__version__)') found without torchvision: adding torchvision==$tv" >&2
    "$PY" -m pip install -q --no-deps "torchvision==$tv"
fi
"$PY" -m pip install -q -e ".[test]"
echo "[install] clpt installed: $("$PY" -c 'import torch, clpt; print(f"clpt {clpt.__version__}, torch {torch.__version__}")')" >&2
