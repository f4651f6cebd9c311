from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import pytest

from hpo.errors import HpoError
from hpo.learn import devices


def test_threads_are_split_between_local_workers():
    assert devices.threads_per_worker(2, cores=2) == 1
    assert devices.threads_per_worker(4, cores=16) == 4
    assert devices.threads_per_worker(8, cores=2) == 1  # never zero


def test_slots_fill_every_gpu_evenly_until_none_is_left(tmp_path):
    held = list(devices._claims)
    try:
        taken = [devices.claim_gpu(2, slots=2, directory=tmp_path, wait=False) for _ in range(4)]
        assert taken == [(0, 0), (1, 0), (0, 1), (1, 1)]
        with pytest.raises(HpoError, match=r"all 2 GPUs x 2 slots on this host are claimed"):
            devices.claim_gpu(2, slots=2, directory=tmp_path, wait=False)
    finally:
        for f in devices._claims[len(held) :]:
            f.close()
        del devices._claims[len(held) :]


def test_a_killed_workers_slot_is_reclaimed(tmp_path):
    """A real process claims GPU 0's slot and is SIGKILLed; the next claimant gets that slot back."""
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from hpo.learn import devices; from pathlib import Path;"
            f"print(*devices.claim_gpu(2, 1, Path({str(tmp_path)!r})), flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().split() == ["0", "0"]
        held = list(devices._claims)
        assert devices.claim_gpu(2, 1, tmp_path, wait=False) == (1, 0)  # GPU 0 is taken by the live child
        devices._claims.pop().close()
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        assert devices.claim_gpu(2, 1, tmp_path, wait=False) == (0, 0)
        devices._claims.pop().close()
        assert devices._claims == held
    finally:
        child.kill()


@pytest.mark.parametrize("value", [0, -2])
def test_trials_per_gpu_below_one_is_refused(value):
    with pytest.raises(HpoError, match=f"trials per GPU must be at least 1, got {value}"):
        devices.trials_per_gpu(value)


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


JOIN_AND_WAIT = (
    "import sys; from hpo.learn.devices import CpuShare; share = CpuShare.from_env(); print('joined', flush=True);"
    "sys.stdin.readline(); share.leave(); print('left', flush=True); sys.stdin.readline()"
)


def sibling(folder) -> subprocess.Popen:
    """A real process that joins the share in `folder`, then leaves it when told (a line on stdin)."""
    env = {**os.environ, devices.CPU_SHARE_ENV: str(folder)}
    child = subprocess.Popen(
        [sys.executable, "-c", JOIN_AND_WAIT], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert child.stdout.readline() == "joined\n"
    return child


def test_a_cpu_share_gives_a_leaving_workers_cores_to_the_others_however_it_leaves():
    """Three workers of one `hpo optimize` on 4 cores: 1 thread each while all three run (or have not
    started yet), 2 once one leaves, all 4 once another is SIGKILLed."""
    folder = devices.CpuShare.create(3)
    children: list[subprocess.Popen] = []
    try:
        share = devices.CpuShare(folder, cores=4)
        assert (share.running(), share.threads()) == (3, 1)  # two workers not started yet still count
        children = [sibling(folder), sibling(folder)]
        assert (share.running(), share.threads()) == (3, 1)
        children[0].stdin.write("leave\n")
        children[0].stdin.flush()
        assert children[0].stdout.readline() == "left\n"  # it left the share but its process lives on
        assert (share.left(), share.running(), share.threads()) == (1, 2, 2)
        children[1].send_signal(signal.SIGKILL)
        children[1].wait(timeout=10)
        assert (share.left(), share.running(), share.threads()) == (2, 1, 4)
        share.leave()
        assert share.left() == 3
    finally:
        for child in children:
            child.kill()
            child.wait(timeout=10)
        shutil.rmtree(folder)
