#!/usr/bin/env bash
# A screenshot of a study's optuna-dashboard page, taken by headless Chromium, as the README shows it.
# Usage: scripts/dashboard-screenshot.sh STUDY OUT.png [PAGE]   (PAGE: "" for the study page, or "note")
# Runs `hpo dashboard` on the storage hpo would use here (HPO_STORAGE, else runs/hpo.db).
set -euo pipefail
study=$1 out=$2 page=${3:-}
hpo=$(command -v hpo || echo "$(dirname "$0")/../.venv/bin/hpo")
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome) || {
  echo "Chromium is not installed (apt-get install chromium)" >&2; exit 1; }
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$hpo" dashboard --study "$study" --port "$port" > /tmp/hpo-dashboard-$port.log 2>&1 &
dashboard=$!
trap 'kill $dashboard 2>/dev/null || true' EXIT
url=$(for _ in $(seq 60); do grep -o "http://[^ ]*" /tmp/hpo-dashboard-$port.log && break; sleep 0.5; done | head -1)
[ -n "$url" ] || { cat /tmp/hpo-dashboard-$port.log >&2; exit 1; }
for _ in $(seq 60); do curl -fs "http://127.0.0.1:$port/api/studies" >/dev/null && break; sleep 0.5; done
profile=$(mktemp -d)
"$browser" --headless --no-sandbox --disable-gpu --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --user-data-dir="$profile" --hide-scrollbars \
  --virtual-time-budget=20000 --window-size=1400,${HEIGHT:-2400} --screenshot="$out" "$url${page:+/$page}" 2>/dev/null
rm -rf "$profile"
echo "wrote $out from $url${page:+/$page}"
