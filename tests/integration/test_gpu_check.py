"""scripts/gpu-check.sh's CPU fallback, so that the GPU check still runs the day a GPU arrives."""

from __future__ import annotations

import re
import subprocess

import pytest

from conftest import REPO

pytestmark = pytest.mark.integration


def test_gpu_check_runs_every_step_and_prints_one_table(tmp_path, real_data_dir):
    result = subprocess.run(
        ["bash", "scripts/gpu-check.sh", "--cpu", "--work", str(tmp_path / "work")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rows = dict(re.findall(r"^\| (.+?) +\| (.+) \|$", result.stdout, re.MULTILINE))
    assert re.fullmatch(r"[\d,]+ img/s", rows["bench engine on cpu"]), rows
    assert rows["bf16 autocast"].endswith("loss and grads finite: True"), rows
    for slots in (1, 2):
        assert re.match(
            rf"[\d.]+ trials/min over the trials \({slots} x 1 epochs", rows[f"search, {slots} trial(s) per GPU"]
        )
    accuracy = float(re.search(r"test accuracy ([\d.]+) %", rows["final-train (1 epochs)"]).group(1))
    assert 50 < accuracy <= 100, rows  # one epoch on the real training set: far above chance (10 %)
    assert "same class for 100.00%" in rows["export (torchscript, checked on the test split)"], rows
    assert re.fullmatch(r".+ \(0\.\d{3}\); label .+", rows["predict on cpu"]), rows
    resumed = re.fullmatch(
        r"trial (\d+) killed after its epoch-(\d+) checkpoint on cpu; retry (\d+) resumed from epoch (\d+) on cpu "
        r"\(exact: True\), value [\d.]+",
        rows["resume after SIGKILL"],
    )
    assert resumed and int(resumed.group(4)) >= int(resumed.group(2)) >= 1, rows
    headline = re.fullmatch(
        r"test accuracy ([\d.]+) % \([\d.]+-[\d.]+\), (\d+) trials \(\d+ complete, \d+ pruned\), [12] member\(s\) "
        r"x 1 epochs(?: \+ [12] trial model\(s\))?, \d+ s",
        rows["hpo optimize --study tiny --time 90s --final"],
    )
    assert headline and 50 < float(headline.group(1)) <= 100 and int(headline.group(2)) >= 2, rows
