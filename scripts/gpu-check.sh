#!/usr/bin/env bash
# The whole GPU path in under 10 minutes, one table: bench on the GPU against the notebook pipeline
# and the CPU engine, bf16 autocast, a short cnn search at 1/2/4/8 trials per GPU (trials/min, GPU
# utilisation and memory), final-train and its test accuracy, export and predict on the GPU.
# Without CUDA (or with --cpu) it runs the same steps on the CPU at a toy size: CI runs that.
#   bash scripts/gpu-check.sh [--cpu] [--work DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh
exec .venv/bin/python scripts/gpu_check.py "$@"
