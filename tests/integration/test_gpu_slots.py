"""Several trials per GPU: real worker processes claim slots of 2 (pretended) GPUs x 3 slots.

There is no GPU here, so HPO_GPU_COUNT makes the workers claim slots of two GPUs that torch does not
see; they hold their slots exactly as on a GPU host and train on the CPU.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from integration.test_postgres import study_file, wait_for

pytestmark = pytest.mark.integration


def held(lock: Path) -> bool:
    """Whether a live process holds the flock on `lock` (asked the kernel's way: try to take it)."""
    with open(lock, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def test_six_workers_fill_two_gpus_by_three_slots_and_a_seventh_waits_for_one(tmp_path, real_data_dir):
    locks = tmp_path / "locks"
    study = tmp_path / "pg.toml"
    study.write_text(study_file(tmp_path, n_trials=2000, epochs=1, subset=300).read_text())
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    env = {
        **os.environ,
        "HPO_GPU_COUNT": "2",
        "HPO_TRIALS_PER_GPU": "3",
        "HPO_GPU_LOCK_DIR": str(locks),
        "HPO_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "HPO_STORAGE": url,
    }
    procs: list[subprocess.Popen] = []
    logs: list[Path] = []

    def start() -> subprocess.Popen:
        logs.append(tmp_path / f"worker-{len(procs)}.log")
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "hpo", "worker", "--study", str(study), "--data-dir", str(real_data_dir)],
                cwd=tmp_path,
                env=env,
                stdout=logs[-1].open("w"),
                stderr=subprocess.STDOUT,
            )
        )
        return procs[-1]

    slots = [locks / f"gpu-{g}-slot-{s}.lock" for g in range(2) for s in range(3)]
    try:
        for _ in range(6):
            start()
        wait_for(lambda: all(p.exists() and held(p) for p in slots), 120, "all six slots to be held")
        owners = {int(p.read_text().split()[1]) for p in slots}
        assert owners == {p.pid for p in procs}  # one live worker per slot
        seventh = start()
        wait_for(lambda: "waiting for one to free up" in logs[-1].read_text(), 120, "the seventh worker to wait")
        assert seventh.poll() is None  # waiting, not exiting into a restart loop

        # The finalizer needs no slot: it runs while all six are held.
        wait_for(
            lambda: any(
                t.state == optuna.trial.TrialState.COMPLETE
                for t in optuna.load_study(study_name="pg", storage=url).trials
            ),
            120,
            "a COMPLETE trial",
        )
        final = subprocess.run(
            [
                sys.executable,
                "-m",
                "hpo",
                "final-train",
                "--study",
                "pg",
                "--epochs",
                "1",
                "--data-dir",
                str(real_data_dir),
                "--out",
                str(tmp_path / "final"),
            ],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert final.returncode == 0, final.stdout + final.stderr
        assert all(held(p) for p in slots)

        victim = int((locks / "gpu-0-slot-0.lock").read_text().split()[1])
        os.kill(victim, signal.SIGKILL)
        wait_for(
            lambda: "claimed GPU 0 slot 0, freed by another worker" in logs[-1].read_text(),
            60,
            "the seventh worker to take the killed worker's slot",
        )
        assert int((locks / "gpu-0-slot-0.lock").read_text().split()[1]) == seventh.pid
    finally:
        for p in procs:
            p.kill()
