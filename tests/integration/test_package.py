"""The wheel, built and installed into a fresh virtual environment outside the checkout, works."""

from __future__ import annotations

import subprocess
import sys
import zipfile

import pytest

from conftest import REPO

pytestmark = pytest.mark.integration


def test_the_wheel_installs_in_a_fresh_venv_and_runs_a_packaged_study(tmp_path, real_data_dir):
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(REPO)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    wheel = next(dist.glob("hpo_service-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert {"hpo/studies/tiny.toml", "hpo/studies/cnn.toml", "hpo/studies/cnn-quick.toml"} <= names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "Name: hpo-service" in meta and "License-Expression: MIT" in meta
    for requirement in ("numpy", "pillow", "tqdm", "optuna", "torch"):
        assert f"Requires-Dist: {requirement}" in meta, requirement

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    install = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", str(wheel)], capture_output=True, text=True, timeout=1200
    )
    assert install.returncode == 0, install.stderr[-3000:]
    away = tmp_path / "elsewhere"  # no studies/ here: the packaged files must be found
    away.mkdir()

    def hpo(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(venv / "bin" / "hpo"), *args], cwd=away, capture_output=True, text=True, timeout=600)

    version = hpo("--version")
    assert version.returncode == 0 and version.stdout.strip() == "hpo, version 0.1.0", version.stdout
    empty = hpo("studies", "--storage", f"sqlite:///{away / 'empty.db'}")
    assert empty.returncode == 0 and "no studies in this storage yet" in empty.stdout, empty.stdout + empty.stderr
    url = f"sqlite:///{away / 'hpo.db'}"
    run = hpo("optimize", "--study", "tiny", "--workers", "1", "--storage", url, "--data-dir", str(real_data_dir))
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    listed = hpo("studies", "--storage", url)
    assert listed.stdout.splitlines()[1].split()[:4] == ["tiny", "max", "val_accuracy", "8/8"], listed.stdout
