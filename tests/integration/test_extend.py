"""`hpo extend` raises the budget of a study while its workers run; they go on to the new budget exactly."""

from __future__ import annotations

import os
import subprocess
import sys

import optuna
import pytest

from integration.test_postgres import study_file, wait_for

pytestmark = pytest.mark.integration


def test_two_running_workers_go_on_from_8_to_12_finished_trials(tmp_path, real_data_dir):
    study = study_file(tmp_path, n_trials=8, epochs=3, subset=1500)
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    env = {**os.environ, "HPO_STORAGE": url, "HPO_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "hpo", "worker", "--study", str(study), "--data-dir", str(real_data_dir)],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    try:

        def finished() -> int:
            try:
                trials = optuna.load_study(study_name="pg", storage=url).trials
            except KeyError:
                return 0
            return sum(t.state.name in ("COMPLETE", "PRUNED") for t in trials)

        wait_for(lambda: finished() >= 1, 180, "a first finished trial")
        extend = subprocess.run(
            [sys.executable, "-m", "hpo", "extend", "--study", "pg", "--trials", "12"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert extend.returncode == 0, extend.stdout + extend.stderr
        assert all(w.poll() is None for w in workers), "the workers stopped before the extension"
        outputs = [w.communicate(timeout=600)[0] for w in workers]
        assert [w.returncode for w in workers] == [0, 0], outputs
    finally:
        for w in workers:
            w.kill()
    trials = optuna.load_study(study_name="pg", storage=url).trials
    states = [t.state.name for t in trials]
    assert finished() == 12 and "RUNNING" not in states and "WAITING" not in states, states
    assert any("budget met: 12/12 trials finished" in out for out in outputs), outputs
