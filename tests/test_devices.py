from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from hpo import devices
from hpo.errors import HpoError


def test_threads_are_split_between_local_workers():
    assert devices.threads_per_worker(2, cores=2) == 1
    assert devices.threads_per_worker(4, cores=16) == 4
    assert devices.threads_per_worker(8, cores=2) == 1  # never zero


def test_each_claim_takes_a_different_gpu_until_none_is_left(tmp_path):
    held = list(devices._claims)
    try:
        assert devices.claim_gpu(2, tmp_path) == 0
        assert devices.claim_gpu(2, tmp_path) == 1
        with pytest.raises(HpoError, match="all 2 GPUs on this host are claimed"):
            devices.claim_gpu(2, tmp_path)
    finally:
        for f in devices._claims[len(held):]:
            f.close()
        del devices._claims[len(held):]


def test_a_killed_workers_gpu_is_reclaimed(tmp_path):
    """A real process claims GPU 0 and is SIGKILLed; the next claimant gets GPU 0 back."""
    child = subprocess.Popen([sys.executable, "-c",
                              "import sys, time; from hpo import devices; from pathlib import Path;"
                              f"print(devices.claim_gpu(2, Path({str(tmp_path)!r})), flush=True); time.sleep(60)"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "0"
        held = list(devices._claims)
        assert devices.claim_gpu(2, tmp_path) == 1  # GPU 0 is taken by the live child
        devices._claims.pop().close()
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        assert devices.claim_gpu(2, tmp_path) == 0
        devices._claims.pop().close()
        assert devices._claims == held
    finally:
        child.kill()


def test_cpu_placement_pins_threads():
    placement = devices.place("cpu", threads=1)
    assert placement.device.type == "cpu" and placement.threads == 1
    assert placement.describe()["gpu_index"] is None


def test_asking_for_cuda_without_a_gpu_is_a_clear_error():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU (CI machines have none), so the CPU-only message cannot be shown")
    with pytest.raises(HpoError, match="torch sees no GPU here"):
        devices.place("cuda:0")
