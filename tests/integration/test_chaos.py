"""The chaos run, short: 4 workers on PostgreSQL while kills, pauses, restarts and a NaN trial hit them."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.integration


def test_a_short_chaos_run_leaves_a_clean_study(tmp_path, postgres, real_data_dir):
    # `postgres` makes sure the server binaries are there; the script runs its own server, which it restarts.
    run = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "chaos.py"),
            "--minutes",
            "3",
            "--every",
            "12",
            "--seed",
            "3",
            "--data-dir",
            str(real_data_dir),
            "--out",
            str(tmp_path / "chaos"),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "all checks passed" in run.stdout
    injected = dict(re.findall(r"(kill|pause|db|nan|noheart|requeue) x(\d+)", run.stdout))
    assert all(int(injected[k]) >= 1 for k in ("kill", "pause", "db", "nan", "noheart", "requeue")), run.stdout
    assert re.search(r"ok\s+lost retries \(FAIL says re-queued, no copy\)\s+0", run.stdout), run.stdout
    assert re.search(r"ok\s+RUNNING or WAITING\s+0", run.stdout), run.stdout
