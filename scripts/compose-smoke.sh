#!/usr/bin/env bash
# The real compose stack on this host, CPU variant: `up --scale worker=N` runs the tiny study to its
# exact budget, `run --rm worker hpo final-train` finalizes it, the dashboard answers on
# 127.0.0.1:8080, `run --rm worker hpo status` works with nothing but a .env, and the study survives
# `down`/`up`. Checks the results in the database itself. Too heavy for CI (it builds the image,
# torch included). Usage:
#   BASE_IMAGE=hpo-standin/python:3.11-slim scripts/compose-smoke.sh [workers]
# The CPU override builds the lean image (hpo:cpu, PyTorch's CPU-only build); HPO_IMAGE=hpo:latest
# TORCH_INDEX=https://pypi.org/simple runs the default CUDA image instead. A host that reaches
# neither index passes TORCH_FIND_LINKS (a page of wheels) and TORCH_PACKAGES (see the Dockerfile).
set -euo pipefail
cd "$(dirname "$0")/.."
workers=${1:-4}
export COMPOSE_PROJECT_NAME=hpo-smoke
export POSTGRES_USER=hpo POSTGRES_DB=hpo HPO_STUDY=tiny HPO_THREADS=1
POSTGRES_PASSWORD="smoke-$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')"
export POSTGRES_PASSWORD
export BASE_IMAGE=${BASE_IMAGE:-python:3.11-slim}
# Locally added CAs (a TLS-inspecting proxy's, say) go into the build so pip can reach PyPI.
if [ -z "${EXTRA_CA_CERTS:-}" ] && ls /usr/local/share/ca-certificates/*.crt >/dev/null 2>&1; then
  EXTRA_CA_CERTS="$(cat /usr/local/share/ca-certificates/*.crt)"
  export EXTRA_CA_CERTS
fi
compose=(docker compose --env-file /dev/null -f docker-compose.yml -f docker-compose.cpu.yml)
n_trials=$(sed -n 's/^n_trials = \([0-9]*\).*/\1/p' studies/tiny.toml)
fail() { echo "FAIL: $*" >&2; "${compose[@]}" logs --tail 40 >&2 || true; exit 1; }
sql() { "${compose[@]}" exec -T -e PGPASSWORD="$POSTGRES_PASSWORD" postgres psql -U "$POSTGRES_USER" -d "$POSTGRES_DB" -At -F ' ' -c "$1"; }
step() { printf '\n== %s\n' "$*"; }

step "build (BASE_IMAGE=$BASE_IMAGE, TORCH_INDEX=${TORCH_INDEX:-as the compose files set it})"
"${compose[@]}" build --quiet
images=$("${compose[@]}" config --images)
image=$(grep -m1 '^hpo:' <<<"$images")
echo "image $image: $(docker image inspect -f '{{.Size}}' "$image" | awk '{printf "%.2f GB", $1 / 1e9}'), torch $(docker run --rm --entrypoint python3 "$image" -c 'import torch; print(torch.__version__)')"
"${compose[@]}" down -v --remove-orphans >/dev/null 2>&1 || true

step "up --scale worker=$workers"
started=$(date +%s)
"${compose[@]}" up -d --scale "worker=$workers"
for _ in $(seq 600); do
  running=$("${compose[@]}" ps --status running -q worker | wc -l)
  [ "$running" -eq 0 ] && break
  sleep 2
done
[ "$running" -eq 0 ] || fail "workers still running after 20 minutes"
echo "all $workers workers exited after $(( $(date +%s) - started ))s"
"${compose[@]}" ps -a --format '{{.Service}} {{.Name}} {{.State}} {{.ExitCode}}' worker create
codes=$("${compose[@]}" ps -a --format '{{.ExitCode}}' worker | sort -u | tr '\n' ' ')
[ "$codes" = "0 " ] || fail "worker exit codes: $codes"

step "trials in PostgreSQL"
q="SELECT t.state, count(*) FROM trials t JOIN studies s USING (study_id) WHERE s.study_name = '$HPO_STUDY' GROUP BY t.state ORDER BY 1"
sql "$q"
finished=$(sql "SELECT count(*) FROM trials t JOIN studies s USING (study_id) WHERE s.study_name = '$HPO_STUDY' AND t.state IN ('COMPLETE', 'PRUNED')")
open=$(sql "SELECT count(*) FROM trials t JOIN studies s USING (study_id) WHERE s.study_name = '$HPO_STUDY' AND t.state IN ('RUNNING', 'WAITING')")
hosts=$(sql "SELECT count(DISTINCT a.value_json) FROM trial_user_attributes a JOIN trials t USING (trial_id) JOIN studies s USING (study_id) WHERE s.study_name = '$HPO_STUDY' AND a.key = 'host'")
echo "finished $finished of budget $n_trials, running/waiting $open, trials came from $hosts worker containers"
[ "$finished" -eq "$n_trials" ] || fail "expected exactly $n_trials finished trials"
[ "$open" -eq 0 ] || fail "trials left RUNNING or WAITING"
[ "$hosts" -ge 2 ] || fail "the workers did not share the study"

step "run --rm worker hpo final-train --study $HPO_STUDY"
"${compose[@]}" run --rm worker hpo final-train --study "$HPO_STUDY" 2>&1 | grep -v " INFO " | tail -3
sql "SELECT value_json FROM study_user_attributes a JOIN studies s USING (study_id) WHERE s.study_name = '$HPO_STUDY' AND a.key = 'hpo:final'"

step "dashboard on 127.0.0.1:8080"
for _ in $(seq 30); do curl -fsS http://127.0.0.1:8080/api/studies >/tmp/hpo-smoke-studies.json 2>/dev/null && break; sleep 1; done
python3 -c "import json; s=json.load(open('/tmp/hpo-smoke-studies.json'))['study_summaries']; print('studies served:', [x['study_name'] for x in s])"
grep -q "\"$HPO_STUDY\"" /tmp/hpo-smoke-studies.json || fail "dashboard does not list $HPO_STUDY"
docker ps --filter "name=${COMPOSE_PROJECT_NAME}-dashboard" --format '{{.Ports}}'
# The finalizer's plots, written by a `run --rm worker` container, served by the dashboard container.
python3 - "$HPO_STUDY" <<'PY' || fail "the dashboard does not serve the finalizer's artifacts"
import json, sys, urllib.request
base = "http://127.0.0.1:8080"
studies = json.load(urllib.request.urlopen(f"{base}/api/studies"))["study_summaries"]
study_id = next(s["study_id"] for s in studies if s["study_name"] == sys.argv[1])
detail = json.load(urllib.request.urlopen(f"{base}/api/studies/{study_id}?after=0"))
names = {a["filename"]: a["artifact_id"] for a in detail["artifacts"]}
print("study artifacts:", sorted(names))
for png in ("confusion_matrix.png", "learning_curve.png", "misclassified.png"):
    body = urllib.request.urlopen(f"{base}/artifacts/{study_id}/{names[png]}").read()
    assert body[:8] == b"\x89PNG\r\n\x1a\n", png
print("note:", detail["note"]["body"].splitlines()[0])
assert detail["note"]["body"].startswith("## Final-trained: test accuracy")
PY
pg_ports=$(docker ps --filter "name=${COMPOSE_PROJECT_NAME}-postgres" --format '{{.Ports}}')
case "$pg_ports" in *"->"*) fail "postgres is published to the host: $pg_ports" ;; esac
echo "postgres ports: ${pg_ports:-none} (not published to the host)"
echo "worker runs as: $("${compose[@]}" run --rm --no-deps --entrypoint id worker)"

step "one-off commands: the tools service, and run --rm worker with nothing but .env"
tools_out=$("${compose[@]}" run --rm tools hpo status) || fail "run --rm tools hpo status"
head -7 <<<"$tools_out"
# A directory holding the compose files, the studies and a .env, and an environment holding nothing
# else: what a user has after `cp .env.example .env`.
bare=$(mktemp -d)
cp docker-compose.yml docker-compose.cpu.yml "$bare/" && cp -rL studies "$bare/"
sed -e "s/^POSTGRES_PASSWORD=.*/POSTGRES_PASSWORD=$POSTGRES_PASSWORD/" -e "s/^HPO_STUDY=.*/HPO_STUDY=$HPO_STUDY/" \
    -e 's/^# COMPOSE_FILE=/COMPOSE_FILE=/' .env.example >"$bare/.env"
printf 'COMPOSE_PROJECT_NAME=%s\nHPO_IMAGE=%s\n' "$COMPOSE_PROJECT_NAME" "$image" >>"$bare/.env"
bare_out=$(cd "$bare" && env -i PATH="$PATH" HOME="$HOME" docker compose run --rm worker hpo status 2>&1) \
  || fail "run --rm worker hpo status with only .env: $bare_out"
echo "\$ docker compose run --rm worker hpo status   # in a directory with only .env, compose files, studies"
grep -v -e "^ Container" -e "level=warning" <<<"$bare_out" | head -7
rm -rf "$bare"
echo "dashboard runs with init: $(docker inspect -f '{{.HostConfig.Init}}' "${COMPOSE_PROJECT_NAME}-dashboard-1")"
t0=$(date +%s); "${compose[@]}" stop dashboard >/dev/null; echo "dashboard stopped in $(( $(date +%s) - t0 ))s (SIGTERM, not the 10 s kill)"

step "the study survives down/up"
"${compose[@]}" down
"${compose[@]}" up -d --wait postgres
after=$(sql "SELECT count(*) FROM trials t JOIN studies s USING (study_id) WHERE s.study_name = '$HPO_STUDY' AND t.state IN ('COMPLETE', 'PRUNED')")
echo "finished trials after down/up: $after"
[ "$after" -eq "$n_trials" ] || fail "trials lost across down/up"
"${compose[@]}" down -v
echo; echo "compose smoke: OK"
