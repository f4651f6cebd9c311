#!/usr/bin/env bash
# README's "Workers on more hosts", run for real on one machine: the compose stack (CPU override)
# with PostgreSQL published and artifacts on S3 (moto's S3 server on this host stands in for MinIO
# or AWS), and workers on two more "hosts", each started with one command: a container outside the
# compose project and a pip-installed `hpo worker` in an empty directory, both reaching the database
# and S3 by this host's address. Checks that both hosts ran
# trials, that the finalizer's files went to the bucket and that the dashboard serves them.
#   scripts/hosts-smoke.sh        (after scripts/compose-smoke.sh has built the image)
set -euo pipefail
cd "$(dirname "$0")/.."
export COMPOSE_PROJECT_NAME=hpo-hosts POSTGRES_USER=hpo POSTGRES_DB=hpo HPO_STUDY=tiny HPO_THREADS=1
POSTGRES_PASSWORD="hosts-$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')"
host_ip=$(hostname -I | awk '{print $1}')
s3_port=${S3_PORT:-9199}
export POSTGRES_PASSWORD HPO_DB_PUBLISH="$host_ip:55432" HPO_ARTIFACTS=s3://hpo-artifacts
export AWS_ENDPOINT_URL="http://$host_ip:$s3_port" AWS_ACCESS_KEY_ID=hpo-hosts-key AWS_SECRET_ACCESS_KEY=hpo-hosts-secret
compose=(docker compose --env-file /dev/null -f docker-compose.yml -f docker-compose.cpu.yml -f docker-compose.hosts.yml)
image=${HPO_IMAGE:-hpo:cpu}
export HPO_IMAGE=$image
fail() { echo "FAIL: $*" >&2; "${compose[@]}" logs --tail 30 >&2 || true; exit 1; }
step() { printf '\n== %s\n' "$*"; }
sql() { "${compose[@]}" exec -T -e PGPASSWORD="$POSTGRES_PASSWORD" postgres psql -U hpo -d hpo -At -F ' ' -c "$1"; }

step "S3 on $AWS_ENDPOINT_URL (moto's server), bucket hpo-artifacts"
.venv/bin/moto_server -H 0.0.0.0 -p "$s3_port" >/tmp/hpo-hosts-moto.log 2>&1 &
moto=$!
trap 'kill $moto 2>/dev/null; "${compose[@]}" down -v >/dev/null 2>&1 || true; docker rm -f hpo-second-host >/dev/null 2>&1 || true' EXIT
for _ in $(seq 50); do curl -fsS "$AWS_ENDPOINT_URL/moto-api/" >/dev/null 2>&1 && break; sleep 0.2; done
.venv/bin/python -c "import boto3; boto3.client('s3', region_name='us-east-1').create_bucket(Bucket='hpo-artifacts')"

step "this host: up -d --scale worker=1, PostgreSQL published on $HPO_DB_PUBLISH"
"${compose[@]}" down -v --remove-orphans >/dev/null 2>&1 || true
"${compose[@]}" up -d --wait postgres >/dev/null
"${compose[@]}" run --rm create >/dev/null
"${compose[@]}" up -d --scale worker=1

step "two more hosts: one command each (a container, and a pip install in an empty directory)"
cat >/tmp/hpo-second-host.env <<ENV
HPO_STORAGE=postgresql+psycopg2://hpo:$POSTGRES_PASSWORD@$HPO_DB_PUBLISH/hpo
HPO_STUDY=tiny
HPO_ARTIFACTS=s3://hpo-artifacts
AWS_ENDPOINT_URL=$AWS_ENDPOINT_URL
AWS_ACCESS_KEY_ID=$AWS_ACCESS_KEY_ID
AWS_SECRET_ACCESS_KEY=$AWS_SECRET_ACCESS_KEY
HPO_DEVICE=cpu
HPO_THREADS=1
ENV
third=$(mktemp -d)
echo "env \$(cat worker.env) hpo worker      # in an empty directory, in the background"
hpo_bin="$PWD/.venv/bin/hpo"   # what `pip install 'hpo-service[s3]'` puts on another host's PATH
# shellcheck disable=SC2046  # one VAR=value word per line of the file, as `env` wants them
(cd "$third" && env $(cat /tmp/hpo-second-host.env) "$hpo_bin" worker >"$third/worker.log" 2>&1) &
pip_worker=$!
echo "docker run --rm --env-file worker.env $image worker"
docker run --rm --name hpo-second-host --hostname second-host --env-file /tmp/hpo-second-host.env "$image" worker 2>&1 \
  | grep -E "joins study|worker done" || fail "the second host's worker failed"
for _ in $(seq 300); do
  [ "$("${compose[@]}" ps --status running -q worker | wc -l)" -eq 0 ] && break
  sleep 1
done
wait "$pip_worker" || fail "the pip-installed worker exited non-zero: $(cat "$third/worker.log")"
grep -E "joins study|worker done" "$third/worker.log"

step "trials by host"
sql "SELECT a.value_json, count(*) FROM trial_user_attributes a JOIN trials t USING (trial_id) WHERE a.key = 'host' GROUP BY 1 ORDER BY 1"
hosts=$(sql "SELECT count(DISTINCT value_json) FROM trial_user_attributes WHERE key = 'host'")
[ "$hosts" -ge 2 ] || fail "only $hosts host ran trials"
grep -q second-host <<<"$(sql "SELECT value_json FROM trial_user_attributes WHERE key = 'host'")" || fail "no trial from the second host"

step "final-train (tools service) uploads to S3; the dashboard serves the plots from S3"
"${compose[@]}" run --rm tools hpo final-train 2>&1 | grep -v " INFO " | tail -1
keys=$(.venv/bin/python -c "import boto3; print(len(boto3.client('s3', region_name='us-east-1').list_objects_v2(Bucket='hpo-artifacts').get('Contents', [])))")
echo "objects in s3://hpo-artifacts: $keys"
[ "$keys" -ge 5 ] || fail "the finalizer's files are not in the bucket"
local_files=$("${compose[@]}" run --rm --no-deps --entrypoint sh tools -c 'ls /work/runs/artifacts 2>/dev/null | wc -l')
echo "files in the runs volume's artifacts directory: $local_files"
[ "$local_files" -eq 0 ] || fail "artifacts were written to the local volume"
for _ in $(seq 30); do curl -fsS http://127.0.0.1:8080/api/studies >/dev/null 2>&1 && break; sleep 1; done
.venv/bin/python - <<'PY' || fail "the dashboard does not serve the plots from S3"
import json, urllib.request
base = "http://127.0.0.1:8080"
detail = json.load(urllib.request.urlopen(f"{base}/api/studies/1?after=0"))
names = {a["filename"]: a["artifact_id"] for a in detail["artifacts"]}
for png in ("confusion_matrix.png", "learning_curve.png", "misclassified.png"):
    assert urllib.request.urlopen(f"{base}/artifacts/1/{names[png]}").read()[:8] == b"\x89PNG\r\n\x1a\n", png
print("dashboard served from S3:", sorted(n for n in names if n.endswith(".png")))
PY
echo; echo "hosts smoke: OK"
