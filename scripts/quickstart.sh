#!/usr/bin/env bash
# The whole job on one machine, no Docker and no server: a cnn-quick study with 2 local workers on
# the embedded SQLite storage (runs/hpo.db) and the finalizer on the untouched test split, all
# inside a 10-minute time budget (HPO_TIME overrides it, e.g. HPO_TIME=30m).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
lscpu | grep -E "^Model name" || true
started=$(date +%s)
.venv/bin/hpo optimize --study cnn-quick --workers 2 --time "${HPO_TIME:-10m}" --final
echo "study + final-train wall time: $(( $(date +%s) - started ))s"
