"""The artifact store: checkpoints and plots, shared by workers, the finalizer and the dashboard.

Optuna keeps an artifact's bytes in the store and its metadata in the study or trial's system
attributes (`artifacts:<id>`), which is where optuna-dashboard looks. A location is a directory
(FileSystemArtifactStore) or `s3://BUCKET` (Boto3ArtifactStore; the endpoint and credentials come
from boto3's usual environment, e.g. AWS_ENDPOINT_URL for MinIO).
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import optuna
from optuna.artifacts import Boto3ArtifactStore, FileSystemArtifactStore, upload_artifact
from optuna.artifacts.exceptions import ArtifactNotFound
from sqlalchemy.engine import make_url

from hpo.errors import HpoError, StorageError
from hpo.paths import default_artifacts
from hpo.search.optuna_compat import ArtifactStore, study_id, study_storage, trial_id

ATTR_PREFIX = "artifacts:"  # where optuna.artifacts.upload_artifact records an artifact's metadata
# Python's guess for .pt is a Super Nintendo format; the dashboard shows images inline by their type.
MIMETYPES = {".png": "image/png", ".json": "application/json", ".md": "text/markdown"}


def default_location(storage_url: str) -> str:
    """Beside the embedded SQLite file; runs/artifacts for a server database."""
    url = make_url(storage_url)
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        return str(Path(url.database).parent / "artifacts")
    return str(default_artifacts())


def resolve_location(explicit: str | None, storage_url: str) -> str:
    """--artifacts, then HPO_ARTIFACTS, then the default beside the storage."""
    return explicit or os.environ.get("HPO_ARTIFACTS") or default_location(storage_url)


def open_store(location: str) -> ArtifactStore:
    if location.startswith("s3://"):
        return open_s3(location)
    if "://" in location:
        scheme = location.split("://", 1)[0]
        raise HpoError(
            f"artifact location {location!r}: scheme {scheme}:// is not supported. Use a directory path or s3://BUCKET."
        )
    path = Path(location)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise HpoError(
            f"cannot create the artifact directory {path} ({e.strerror}). Pass a writable "
            "--artifacts directory (or set HPO_ARTIFACTS)."
        ) from e
    if not os.access(path, os.W_OK | os.X_OK):
        raise HpoError(
            f"artifact directory {path} is not writable. Pass a writable --artifacts directory (or set HPO_ARTIFACTS)."
        )
    return FileSystemArtifactStore(path)


def open_s3(location: str) -> ArtifactStore:
    """A Boto3ArtifactStore on `s3://BUCKET`, checked with one HEAD request so that a wrong endpoint,
    credentials or bucket name fail here with one line, not in a worker's first checkpoint."""
    bucket, _, prefix = location[len("s3://") :].partition("/")
    if not bucket or prefix.strip("/"):
        raise HpoError(
            f"artifact location {location!r}: give a bucket only, like s3://hpo-artifacts "
            "(Optuna's Boto3ArtifactStore keys objects by artifact id, without a prefix)."
        )
    try:
        import boto3
        from botocore.config import Config
    except ImportError as e:
        raise HpoError(
            f"artifact location {location!r} needs boto3. Install it with "
            "`pip install 'hpo-service[s3]'`, or use a directory."
        ) from e
    # Short connect timeouts and a few standard-mode retries: a blip is retried, a wrong
    # AWS_ENDPOINT_URL is reported in seconds (botocore's legacy mode retries for minutes).
    session = boto3.session.Session()
    client = session.client(
        "s3", config=Config(connect_timeout=5, read_timeout=60, retries={"mode": "standard", "max_attempts": 4})
    )
    credentials = session.get_credentials()
    _check_bucket(client, bucket, credentials.access_key if credentials else "")
    return Boto3ArtifactStore(bucket, client=client)


def _check_bucket(client: Any, bucket: str, access_key: str) -> None:
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    endpoint = client.meta.endpoint_url
    try:
        client.head_bucket(Bucket=bucket)
    except NoCredentialsError as e:
        raise StorageError(
            f"no S3 credentials for {endpoint}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)."
        ) from e
    except ClientError as e:
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if status == 404:
            raise StorageError(
                f"S3 bucket {bucket!r} does not exist at {endpoint}. Create it (`aws s3 mb s3://{bucket}`, "
                "or in your S3 server's console), or fix HPO_ARTIFACTS."
            ) from e
        if status in (401, 403):
            raise StorageError(
                f"the S3 endpoint {endpoint} refused access to bucket {bucket!r} for access key "
                f"{_masked(access_key)} (the secret is not shown). Fix AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or the key's permissions on the bucket."
            ) from e
        raise StorageError(f"S3 bucket {bucket!r} at {endpoint}: {e}. Check HPO_ARTIFACTS and AWS_*.") from e
    except BotoCoreError as e:  # no connection, a timeout, a malformed endpoint
        raise StorageError(
            f"the S3 endpoint {endpoint} does not answer ({type(e).__name__}). Check AWS_ENDPOINT_URL "
            "and that the server is up and reachable from this host."
        ) from e


def _masked(access_key: str) -> str:
    """The access key id's first four and last two characters: enough to tell keys apart."""
    return f"{access_key[:4]}...{access_key[-2:]}" if len(access_key) > 8 else "***"


def open_for(explicit: str | None, storage_url: str) -> tuple[str, ArtifactStore]:
    location = resolve_location(explicit, storage_url)
    return location, open_store(location)


def upload_bytes(
    store: ArtifactStore,
    target: optuna.Study | optuna.Trial,
    filename: str,
    payload: bytes,
    storage: optuna.storages.BaseStorage | None = None,
) -> str:
    """Upload `payload` as `filename` (its name on the dashboard) to a study or a running trial."""
    with tempfile.TemporaryDirectory(prefix="hpo-artifact-") as tmp:
        path = Path(tmp) / filename
        path.write_bytes(payload)
        try:
            return upload_artifact(
                artifact_store=store,
                file_path=str(path),
                study_or_trial=target,
                storage=storage,
                mimetype=MIMETYPES.get(path.suffix, "application/octet-stream"),
            )
        except _store_errors() as e:
            raise StorageError(
                f"cannot write artifact {filename} to the artifact store ({e}). Check that "
                "--artifacts (HPO_ARTIFACTS) points to a writable, shared location."
            ) from e


def _store_errors() -> tuple[type[Exception], ...]:
    """What a write to a directory or an S3 bucket raises when the store is away or refuses it."""
    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:
        return (OSError,)
    return (OSError, BotoCoreError, ClientError)


def read_bytes(store: ArtifactStore, artifact_id: str) -> bytes:
    with store.open_reader(artifact_id) as f:
        return f.read()


def remove(store: ArtifactStore, target: optuna.Study | optuna.Trial, artifact_id: str) -> None:
    """Delete the bytes and blank the metadata, as optuna-dashboard's delete button does."""
    try:
        store.remove(artifact_id)
    except ArtifactNotFound:
        pass
    if isinstance(target, optuna.Study):
        study_storage(target).set_study_system_attr(study_id(target), ATTR_PREFIX + artifact_id, json.dumps(None))
    else:
        target.storage.set_trial_system_attr(trial_id(target), ATTR_PREFIX + artifact_id, json.dumps(None))


def disown_inherited(trial: optuna.Trial) -> None:
    """A retried trial starts with a copy of its predecessor's system attributes, artifact entries
    included; the files stay the predecessor's, so the retry drops the entries, not the files."""
    # Not optuna.artifacts.get_all_artifact_meta: it raises on the null entries a removal leaves
    # (the predecessor removed its earlier checkpoints so), so the entries are read here.
    for meta in listed(trial.storage.get_trial_system_attrs(trial_id(trial))):
        trial.storage.set_trial_system_attr(trial_id(trial), ATTR_PREFIX + meta["artifact_id"], json.dumps(None))


def listed(system_attrs: dict[str, Any]) -> list[dict[str, Any]]:
    """The live artifacts recorded in a study's or trial's system attributes."""
    metas = [json.loads(v) for k, v in system_attrs.items() if k.startswith(ATTR_PREFIX)]
    return [m for m in metas if m is not None]


def torch_bytes(obj: Any) -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()
