"""Which device this process trains on, how many CPU threads it owns, and its fast paths."""

from __future__ import annotations

import fcntl
import os
import platform
import socket
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import IO

import torch

from hpo import attrs
from hpo.errors import HpoError


def cpu_count() -> int:
    """Cores this process may run on (respects taskset and container CPU sets)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def threads_per_worker(workers: int, cores: int | None = None) -> int:
    """Split the cores evenly so N local workers never oversubscribe the CPU."""
    return max(1, (cores or cpu_count()) // max(1, workers))


@lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 where the hardware runs it natively, else None (plain fp32)."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    # Without AMX or AVX-512 BF16, CPU bf16 is emulated and slower than fp32.
    return torch.bfloat16 if _cpu_flags() & {"amx_bf16", "avx512_bf16"} else None


@dataclass(frozen=True)
class Placement:
    device: torch.device
    threads: int
    name: str          # what a person would call it: "cpu (1 thread)", "NVIDIA H100 (cuda:0)"
    host: str

    def describe(self) -> dict[str, object]:
        return {"device": str(self.device), "device_name": self.name, "threads": self.threads, attrs.HOST: self.host,
                "gpu_index": self.device.index if self.device.type == "cuda" else None}


_claims: list[IO[str]] = []  # open lock files: the claim lasts as long as the process


def lock_dir() -> Path:
    """Where workers on one host claim GPUs; compose mounts one shared volume here for all workers."""
    return Path(os.environ.get("HPO_GPU_LOCK_DIR") or Path(tempfile.gettempdir()) / "hpo-gpu-locks")


def claim_gpu(count: int, directory: Path | None = None) -> int:
    """Take the first GPU no other live worker on this host holds.

    The claim is an flock on gpu-N.lock; the kernel drops it when the process dies, however it
    dies, so the next worker to start reclaims a crashed worker's GPU.
    """
    directory = directory or lock_dir()
    directory.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        f = open(directory / f"gpu-{index}.lock", "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            continue
        f.seek(0)
        f.truncate()
        f.write(f"{socket.gethostname()} {os.getpid()}\n")
        f.flush()
        _claims.append(f)
        return index
    raise HpoError(f"all {count} GPUs on this host are claimed by other hpo workers (locks in {directory}). "
                   "Run at most one worker per GPU, or pass --device cuda:N to share one on purpose.")


def place(device: str | None = None, threads: int | None = None) -> Placement:
    """Choose the device and pin the CPU thread count.

    With no --device/HPO_DEVICE: the first unclaimed GPU on a CUDA host, else the CPU.
    """
    wanted = device or os.environ.get("HPO_DEVICE")
    if wanted is None and torch.cuda.is_available():
        wanted = f"cuda:{claim_gpu(torch.cuda.device_count())}"
    dev = torch.device(wanted or "cpu")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", 0)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise HpoError(f"--device {wanted} asks for CUDA, but torch sees no GPU here. Use --device cpu.")
    n_threads = threads or int(os.environ.get("HPO_THREADS", 0)) or cpu_count()
    torch.set_num_threads(n_threads)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        torch.backends.cudnn.benchmark = True  # fixed input shapes per trial, so autotuning pays off
        name = f"{torch.cuda.get_device_name(dev)} ({dev})"
    else:
        name = f"cpu {platform.processor() or platform.machine()} ({n_threads} thread{'s' if n_threads > 1 else ''})"
    return Placement(dev, n_threads, name, socket.gethostname())
