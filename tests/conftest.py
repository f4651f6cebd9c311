"""Shared fixtures: generated IDX files for the reader, and the real Fashion-MNIST files."""

from __future__ import annotations

import gzip
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from hpo.errors import DataError
from hpo.learn import data

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> Path:
    """Write `array` (uint8) as an IDX file, the format the real data ships in."""
    array = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    payload = header + array.tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        payload = gzip.compress(payload)
    path.write_bytes(payload)
    return path


def make_dataset(directory: Path, n_train: int = 200, n_test: int = 50, seed: int = 0, gz: bool = True) -> Path:
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        images_stem, labels_stem = data.FILES[split]
        write_idx(directory / images_stem, rng.integers(0, 256, (n, 28, 28)), gz)
        write_idx(directory / labels_stem, np.arange(n) % 10, gz)
    return directory


def run_hpo(
    *args: str, cwd: Path, timeout: float = 600, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """`python -m hpo ARGS` as a user runs it, in `cwd`, with HPO_STORAGE unset unless `env` sets it."""
    full = {**os.environ, "PYTHONUNBUFFERED": "1"}
    full.pop("HPO_STORAGE", None)
    full.update(env or {})
    result = subprocess.run(
        [sys.executable, "-m", "hpo", *args], cwd=cwd, env=full, capture_output=True, text=True, timeout=timeout
    )
    if check and result.returncode != 0:
        raise AssertionError(f"hpo {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if not found:
        if IN_CI:
            pytest.fail("CI needs Chromium (apt-get install chromium)")
        pytest.skip("Chromium is not installed")
    return found


CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--virtual-time-budget=15000",
]


def page_text(browser: str, url: str, profile: Path, until: str, tries: int = 30) -> tuple[str, str]:
    """The DOM headless Chromium renders at `url` (after the page's JavaScript ran) and its visible text,
    retried until the text contains `until` or `tries` runs out."""
    dom = text = ""
    for _ in range(tries):
        dom = subprocess.run(
            [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", url],
            capture_output=True,
            text=True,
            timeout=90,
        ).stdout
        text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", re.sub(r"<(style|script).*?</\1>", " ", dom, flags=re.S)))
        if until in text:
            break
        time.sleep(1)
    return dom, text


@pytest.fixture
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The real `hpo` CLI in-process, in an empty working directory with no storage or data set from
    the environment. Without --debug no command may print a traceback, whatever it is asked."""
    from click.testing import CliRunner

    from hpo.cli import cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HPO_STORAGE", raising=False)
    monkeypatch.delenv("HPO_DATA_DIR", raising=False)

    def invoke(*args: str):
        result = CliRunner().invoke(cli, list(args))
        if "--debug" not in args:
            assert "Traceback" not in result.output
        return result

    return invoke


@pytest.fixture
def fake_data_dir(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "fake-fmnist")


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    """The real Fashion-MNIST files (Debian's dataset-fashion-mnist, HPO_DATA_DIR, or the cache)."""
    try:
        return data.find_data_dir()
    except DataError as e:
        if IN_CI:
            pytest.fail(f"CI needs the real Fashion-MNIST files: {e}")
        pytest.skip(f"real Fashion-MNIST files not found: {e}")


@pytest.fixture
def real_data_copy(real_data_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the real files, for tests that alter some of them."""
    target = tmp_path / "fmnist"
    shutil.copytree(real_data_dir, target)
    return target


@pytest.fixture(scope="session")
def postgres():
    """A private PostgreSQL server (needs Debian's `postgresql`); CI fails instead of skipping without it."""
    from pg import PostgresServer

    try:
        server = PostgresServer()
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", "") or ""
        if IN_CI:
            pytest.fail(f"CI needs a PostgreSQL server: {e} {detail}")
        pytest.skip(f"no PostgreSQL server: {e} {detail}")
    yield server
    server.close()


@pytest.fixture
def pg_url(postgres, request) -> str:
    """A fresh, empty database for one test."""
    import re

    name = "t_" + re.sub(r"[^a-z0-9]+", "_", request.node.name.lower())[:50]
    postgres.sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    return postgres.create_database(name)


def user_error(result, *fragments: str) -> str:
    """A user's mistake, as the CLI must report it: exit code 1, one line starting "Error: " that
    holds every fragment, and no traceback. Returns the line."""
    assert result.exit_code == 1, result.output
    line = result.output.strip()
    assert line.startswith("Error: ") and "\n" not in line, result.output
    assert "Traceback" not in result.output, result.output
    for fragment in fragments:
        assert fragment in line, line
    return line
