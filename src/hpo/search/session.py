"""What a command works on, opened in one step: the storage, and the study with its settings.

The CLI's commands take a study argument (a name or a study file's path) and a storage URL; this
module turns them into typed objects, so that no command unpacks tuples of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import optuna

from hpo.errors import HpoError, StudyFileNotFound
from hpo.search import artifacts
from hpo.search.optuna_compat import ArtifactStore
from hpo.search.storage import Storage, resolve_url
from hpo.search.storage import open_storage as open_database
from hpo.search.study import load
from hpo.settings import config
from hpo.settings.config import StudyConfig

if TYPE_CHECKING:  # torch stays out of the read-only commands, which import this module
    from hpo.learn.devices import CpuShare, Placement
    from hpo.learn.sources import DataSet


@dataclass(frozen=True)
class Opened:
    url: str  # the storage URL as resolved (flag, HPO_STORAGE or the default)
    storage: Storage

    def artifact_store(self, location: str | None) -> tuple[str, ArtifactStore]:
        """The artifact store at `location` (a directory or s3://BUCKET), or this storage's default one."""
        return artifacts.open_for(location, self.url)


@dataclass(frozen=True)
class OpenedStudy(Opened):
    study: optuna.Study
    config: StudyConfig  # the settings stored in the study


@dataclass(frozen=True)
class Workspace:
    """What a job works with besides its study and settings: the storage (None: an in-memory study),
    the artifact store (None: nothing is uploaded), this process's device (a GPU slot or CPU
    threads), this host's copy of the study's data (None where the job reads none itself), and the
    cores it shares with the other workers of one `hpo optimize` (None: its threads are fixed)."""

    storage: Storage | None
    artifact_store: ArtifactStore | None
    placement: Placement
    data: DataSet | None = None
    share: CpuShare | None = None


def study_name(study_arg: str) -> str:
    """A name is used as is; a path to a study file gives the name inside it."""
    if config.is_path(study_arg):
        return config.load(study_arg).name
    return study_arg


def open_storage(storage_url: str | None) -> Opened:
    url = resolve_url(storage_url)
    return Opened(url, open_database(url))


def open_study(study_arg: str, storage_url: str | None) -> OpenedStudy:
    """An existing study (it is never created here) with the settings stored in it."""
    opened = open_storage(storage_url)
    study, cfg = load(opened.storage, study_name(study_arg))
    return OpenedStudy(opened.url, opened.storage, study, cfg)


def worker_config(study_arg: str, storage_url: str | None) -> tuple[StudyConfig, Opened]:
    """The study file, or, on a host without it, the settings stored in the existing study.

    The file is read before the storage is opened, so an invalid file writes nothing.
    """
    try:
        cfg = config.load(study_arg)
    except StudyFileNotFound as missing:
        opened = open_storage(storage_url)
        try:
            return load(opened.storage, study_arg)[1], opened
        except HpoError:
            raise missing from None
    return cfg, open_storage(storage_url)


__all__ = ["Opened", "OpenedStudy", "Workspace", "open_storage", "open_study", "study_name", "worker_config"]
