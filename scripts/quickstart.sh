#!/usr/bin/env bash
# The whole job on one machine, no Docker and no server: a cnn-quick study with 2 local workers on
# the embedded SQLite storage (runs/hpo.db), then the finalizer on the untouched test split.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
started=$(date +%s)
.venv/bin/hpo optimize --study cnn-quick --workers 2
.venv/bin/hpo final-train --study cnn-quick
echo "study + final-train wall time: $(( $(date +%s) - started ))s"
