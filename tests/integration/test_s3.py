"""Two "hosts" share one study through PostgreSQL and an S3 artifact store: a real S3-compatible
server (moto's server mode) as its own process on 127.0.0.1, real worker processes in different
working directories, a real SIGKILL, and the dashboard serving the finalizer's plots from S3."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import optuna
import pytest

from conftest import IN_CI, free_port
from conftest import run_hpo as hpo
from hpo.search.artifacts import listed
from integration.test_postgres import wait_for
from integration.test_results import RESUME_STUDY

pytestmark = pytest.mark.integration

BUCKET = "hpo-artifacts"
PNG = b"\x89PNG\r\n\x1a\n"
# The resume test's study (one fixed small CNN, 4 epochs, no pruner), with a trial for each host.
STUDY = RESUME_STUDY.replace('name = "resume"', 'name = "s3-hosts"').replace("n_trials = 1", "n_trials = 2")


@pytest.fixture(scope="module")
def s3(tmp_path_factory) -> dict[str, str]:
    """moto's S3 server with authentication on: an IAM user's key may use the bucket, others may not."""
    server = Path(sys.executable).with_name("moto_server")
    if not server.exists():
        if IN_CI:
            pytest.fail("CI needs moto's server (pip install 'moto[server]')")
        pytest.skip("moto's server is not installed")
    import boto3

    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    # The first four requests (user, key, policy, bucket) go unauthenticated; every later one is checked.
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "4"}
    proc = subprocess.Popen(
        [str(server), "-H", "127.0.0.1", "-p", str(port)], env=env, stdout=log.open("w"), stderr=subprocess.STDOUT
    )
    endpoint = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2)
            return True
        except OSError:
            return False

    try:
        wait_for(up, 60, "moto's server to answer", 0.2)
        admin = {"endpoint_url": endpoint, "region_name": "us-east-1"}
        admin |= {"aws_access_key_id": "bootstrap", "aws_secret_access_key": "bootstrap"}
        iam = boto3.client("iam", **admin)
        iam.create_user(UserName="hpo")
        key = iam.create_access_key(UserName="hpo")["AccessKey"]
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
        iam.put_user_policy(UserName="hpo", PolicyName="s3", PolicyDocument=json.dumps(policy))
        boto3.client("s3", **admin).create_bucket(Bucket=BUCKET)
        yield {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
            "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
            "AWS_DEFAULT_REGION": "us-east-1",
        }
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def bucket_keys(s3: dict[str, str]) -> set[str]:
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=s3["AWS_ENDPOINT_URL"],
        aws_access_key_id=s3["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=s3["AWS_SECRET_ACCESS_KEY"],
        region_name="us-east-1",
    )
    return {o["Key"] for o in client.list_objects_v2(Bucket=BUCKET).get("Contents", [])}


def test_two_hosts_share_checkpoints_and_final_plots_through_s3(tmp_path, pg_url, real_data_dir, s3):
    host_a, host_b = tmp_path / "host-a", tmp_path / "host-b"
    (host_a / "studies").mkdir(parents=True)
    host_b.mkdir()
    (host_a / "studies" / "s3-hosts.toml").write_text(STUDY)  # host B has no study file: it joins by name
    env = {
        **os.environ,
        **s3,
        "HPO_STORAGE": pg_url,
        "HPO_ARTIFACTS": f"s3://{BUCKET}",
        "HPO_DATA_DIR": str(real_data_dir),
        "HPO_HEARTBEAT_INTERVAL": "1",
        "HPO_GRACE_PERIOD": "3",
        "HPO_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }

    def worker(host: Path, log: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "hpo", "worker", "--study", "s3-hosts"],
            cwd=host,
            env=env,
            stdout=(host / log).open("w"),
            stderr=subprocess.STDOUT,
        )

    hpo("create", "--study", "s3-hosts", cwd=host_a, env=env)
    a, b = worker(host_a, "worker.log"), worker(host_b, "worker.log")
    try:

        def a_checkpointed_epoch_2():
            trials = optuna.load_study(study_name="s3-hosts", storage=pg_url).trials
            mine = [t for t in trials if t.user_attrs.get("pid") == a.pid]
            return mine and mine[0].user_attrs.get("checkpoint", {}).get("epoch") == 2 and mine[0]

        killed_number = wait_for(a_checkpointed_epoch_2, 300, "host A to checkpoint epoch 2").number
        a.send_signal(signal.SIGKILL)
        assert a.wait(timeout=30) == -signal.SIGKILL
        # Host B finishes its own trial, reaps A's and resumes it from A's checkpoint in S3.
        assert b.wait(timeout=600) == 0, (host_b / "worker.log").read_text()
    finally:
        for proc in (a, b):
            if proc.poll() is None:
                proc.kill()
    log_b = (host_b / "worker.log").read_text()
    study = optuna.load_study(study_name="s3-hosts", storage=pg_url)
    states = [t.state for t in study.trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 2 and states.count(optuna.trial.TrialState.FAIL) == 1
    killed = study.trials[killed_number]
    retried = next(t for t in study.trials if t.system_attrs.get("failed_trial") == killed_number)
    assert retried.user_attrs["pid"] == b.pid and retried.user_attrs["resumed_from_epoch"] == 2
    assert "resumes after epoch 2" in log_b, log_b
    # The checkpoint it resumed from lies in the bucket, and neither host wrote artifacts to its disk.
    (checkpoint,) = listed(killed.system_attrs)
    assert checkpoint["filename"] == "checkpoint-epoch2.pt" and checkpoint["artifact_id"] in bucket_keys(s3)
    assert not list(host_a.rglob("*.pt")) and not list(host_b.rglob("*.pt"))

    # The finalizer on host B uploads its plots to S3; a dashboard on host A serves them from there.
    hpo("final-train", "--study", "s3-hosts", cwd=host_b, env=env, timeout=900)
    port = free_port()
    dash = subprocess.Popen(
        [sys.executable, "-m", "hpo", "dashboard", "--port", str(port)],
        cwd=host_a,
        env=env,
        stdout=(host_a / "dashboard.log").open("w"),
        stderr=subprocess.STDOUT,
    )
    try:
        base = f"http://127.0.0.1:{port}"

        def studies():
            try:
                return json.load(urllib.request.urlopen(f"{base}/api/studies", timeout=5))["study_summaries"]
            except OSError:
                return None

        summaries = wait_for(studies, 120, "the dashboard to answer", 0.5)
        study_id = next(s["study_id"] for s in summaries if s["study_name"] == "s3-hosts")
        detail = json.load(urllib.request.urlopen(f"{base}/api/studies/{study_id}?after=0", timeout=30))
        served = {a["filename"]: a["artifact_id"] for a in detail["artifacts"]}
        assert {"confusion_matrix.png", "learning_curve.png", "misclassified.png"} <= set(served), served
        assert set(served.values()) <= bucket_keys(s3)
        for name in ("confusion_matrix.png", "learning_curve.png", "misclassified.png"):
            body = urllib.request.urlopen(f"{base}/artifacts/{study_id}/{served[name]}", timeout=30).read()
            assert body[:8] == PNG, name
    finally:
        dash.terminate()
        dash.wait(timeout=30)


@pytest.mark.parametrize("case", ["no endpoint", "wrong secret", "no bucket"])
def test_a_bad_s3_store_is_one_line_and_exit_1_before_the_study_is_touched(tmp_path, s3, case):
    env = {**s3, "HPO_ARTIFACTS": f"s3://{BUCKET}"}
    expected = {
        "no endpoint": "does not answer (EndpointConnectionError). Check AWS_ENDPOINT_URL",
        "wrong secret": f"refused access to bucket '{BUCKET}' for access key {s3['AWS_ACCESS_KEY_ID'][:4]}...",
        "no bucket": "S3 bucket 'nowhere' does not exist",
    }[case]
    if case == "no endpoint":
        env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{free_port()}"
    elif case == "wrong secret":
        env["AWS_SECRET_ACCESS_KEY"] = "not-the-secret-0123456789"
    else:
        env["HPO_ARTIFACTS"] = "s3://nowhere"
    db = tmp_path / "hpo.db"
    result = hpo("worker", "--study", "tiny", "--storage", f"sqlite:///{db}", cwd=tmp_path, env=env, check=False)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and expected in lines[0], result.stderr
    assert env["AWS_SECRET_ACCESS_KEY"] not in result.stderr + result.stdout
    assert not db.exists()  # nothing was created: the store is checked before the storage is opened
