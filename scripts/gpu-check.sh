#!/usr/bin/env bash
# The whole GPU path in under 10 minutes, one table: bench on the GPU against the notebook pipeline
# and the CPU engine, bf16 autocast, a short cnn search at 1/2/4/8 trials per GPU (trials/min, GPU
# utilisation and memory), final-train and its test accuracy, export and predict on the GPU.
# Then the headline figure: `hpo optimize --study cnn --time 10m --final` and its test accuracy.
# Without CUDA (or with --cpu) it runs the same steps on the CPU at a toy size: CI runs that.
# A machine whose commands may run at most 10 minutes: `--only checks`, then `--only headline`.
#   bash scripts/gpu-check.sh [--cpu] [--work DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
# This checkout's .venv; else python3 with the bundle from scripts/gpu-bundle.sh (a GPU machine
# without network access); else a python3 that already has the stack, running the code from src/;
# else install the .venv.
if [ -x .venv/bin/python ]; then
  python=.venv/bin/python
elif [ -d .gpu-bundle/wheels ]; then
  site=$(mktemp -d)
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" .gpu-bundle/wheels/*.whl
  python=python3
  export PYTHONPATH="$PWD/src:$site${PYTHONPATH:+:$PYTHONPATH}" HPO_DATA_DIR="$PWD/.gpu-bundle/fashion-mnist"
elif python3 -c "import torch, optuna, optuna_dashboard, sqlalchemy, click, matplotlib" 2>/dev/null; then
  python=python3
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
else
  bash scripts/setup.sh
  python=.venv/bin/python
fi
exec "$python" scripts/gpu_check.py "$@"
