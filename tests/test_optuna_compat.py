"""Every Optuna private that hpo.search.optuna_compat wraps still behaves as hpo relies on (an Optuna
upgrade that moves one fails here, not in a worker)."""

from __future__ import annotations

import time

import optuna
import pytest
from optuna.artifacts import FileSystemArtifactStore, upload_artifact

from hpo.search import optuna_compat
from hpo.search import storage as storage_mod
from hpo.search.storage import StorageSettings

pytestmark = pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning")
SETTINGS = StorageSettings(heartbeat_interval=1, grace_period=1, max_retry=1)
LR = {"lr": optuna.distributions.FloatDistribution(1e-3, 1e-1, log=True)}


def test_ids_storage_heartbeats_and_stale_trials_through_the_compat_module(tmp_path):
    store = storage_mod.open_storage(f"sqlite:///{tmp_path / 'c.db'}", SETTINGS)
    study = optuna.create_study(study_name="c", storage=store)
    trial = study.ask(LR)
    tid = optuna_compat.trial_id(trial)
    assert store.get_trial(tid).number == trial.number
    assert store.get_study_id_from_name("c") == optuna_compat.study_id(study)
    optuna_compat.study_storage(study).set_study_system_attr(optuna_compat.study_id(study), "k", 1)
    assert store.get_study_system_attrs(optuna_compat.study_id(study))["k"] == 1

    assert optuna_compat.last_heartbeats(store, [tid]) == {}  # no heartbeat yet
    store.record_heartbeat(tid)
    beat, age = optuna_compat.last_heartbeats(store, [tid])[tid]
    assert 0.0 <= age < 5.0 and optuna_compat.heartbeat_ages(store, [tid]) == {tid: pytest.approx(age, abs=2)}
    deadline = time.monotonic() + 30
    while tid not in optuna_compat.stale_trial_ids(store, study):  # SQLite's clock has whole seconds
        assert time.monotonic() < deadline, "the trial never turned stale"
        time.sleep(0.2)


def test_the_artifact_store_protocol_is_the_one_optuna_uploads_through(tmp_path):
    store: optuna_compat.ArtifactStore = FileSystemArtifactStore(str(tmp_path))
    study = optuna.create_study()
    trial = study.ask(LR)
    (tmp_path / "a.txt").write_text("x")
    upload_artifact(artifact_store=store, file_path=str(tmp_path / "a.txt"), study_or_trial=trial)
    assert [m.filename for m in optuna.artifacts.get_all_artifact_meta(trial)] == ["a.txt"]
