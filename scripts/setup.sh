#!/usr/bin/env bash
# Creates .venv in the checkout and installs quintet editable with its test extras.
# torch is installed first and pinned (constraints.txt), so pip never swaps the local CPU
# wheel for a CUDA build. Override the pin for a GPU machine with TORCH_SPEC, e.g.
#   TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
pip install $TORCH_SPEC
pip install -c constraints.txt -e ".[test]"
.venv/bin/python - <<'PY'
import torch
print(f"quintet set up: torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
PY
