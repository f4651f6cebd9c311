"""What each part of the package may import: the read-only commands stay free of torch."""

from __future__ import annotations

import json
import subprocess
import sys

import optuna
import pytest

from hpo.search.storage import open_storage
from hpo.search.study import create_or_load
from hpo.settings import config

RUN_IN_PROCESS = """
import json, sys
from hpo.cli import cli
cli.main(args=sys.argv[1:], standalone_mode=False)
print(json.dumps(sorted(m for m in ("torch", "torchvision", "matplotlib") if m in sys.modules)))
"""


@pytest.fixture(scope="module")
def url(tmp_path_factory) -> str:
    url = f"sqlite:///{tmp_path_factory.mktemp('layers') / 'hpo.db'}"
    study, _ = create_or_load(open_storage(url), config.load("tiny"))
    study.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=0.5))  # for `hpo best`
    return url


@pytest.mark.parametrize("command", [["status", "--study", "tiny"], ["studies"], ["best", "--study", "tiny"]])
def test_the_read_only_commands_import_no_torch(url, command):
    """`hpo status`, `hpo studies` and `hpo best` run where torch is slow to import or absent (a
    laptop watching a GPU host's study): they must not load it, nor matplotlib."""
    result = subprocess.run(
        [sys.executable, "-c", RUN_IN_PROCESS, *command, "--storage", url, "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    *output, loaded = result.stdout.strip().splitlines()
    assert json.loads("\n".join(output))["schema"].startswith("hpo-"), result.stdout
    assert json.loads(loaded) == [], f"`hpo {command[0]}` imported {json.loads(loaded)}"
