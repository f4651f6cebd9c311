#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs what it needs, then runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh postgresql chromium faketime  # the server, browser and clock shifter the integration tests use
echo "== lint and format (ruff) and types (mypy)"
.venv/bin/ruff check src tests scripts
.venv/bin/ruff format --check src tests scripts
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
