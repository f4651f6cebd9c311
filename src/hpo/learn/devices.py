"""Which device this process trains on, how many CPU threads it owns, and its fast paths."""

from __future__ import annotations

import fcntl
import logging
import os
import platform
import socket
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import IO

import torch

from hpo import attrs
from hpo.errors import HpoError
from hpo.settings.envvars import env_int

log = logging.getLogger(__name__)


def cpu_count() -> int:
    """Cores this process may run on (respects taskset and container CPU sets)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def finalizer_threads(on_gpu: bool, threads: int) -> int:
    """The finalizer has the machine alone: every core on a CPU, a worker's `threads` beside a GPU."""
    return threads if on_gpu else cpu_count()


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


def describe_cpu() -> str:
    """ "AMD EPYC 7B13 (AVX2 only)": the CPU's model and the instructions that decide its bf16
    speed, as every quoted time must say (AMX, AVX-512 BF16, or AVX2 only)."""
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    flags = _cpu_flags()
    kind = "AMX" if "amx_bf16" in flags else "AVX-512 BF16" if "avx512_bf16" in flags else "AVX2 only"
    return f"{model} ({kind})"


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
    name: str  # what a person would call it: "cpu (1 thread)", "NVIDIA H100 (cuda:0)"
    host: str
    slot: tuple[int, int] | None = None  # (GPU, slot) this worker holds, if it claimed one

    def describe(self) -> dict[str, object]:
        return {
            attrs.DEVICE: str(self.device),
            attrs.DEVICE_NAME: self.name,
            attrs.THREADS: self.threads,
            attrs.HOST: self.host,
            attrs.GPU_INDEX: self.device.index if self.device.type == "cuda" else None,
            attrs.GPU_SLOT: None if self.slot is None else list(self.slot),
        }


_claims: list[IO[str]] = []  # open lock files: the claim lasts as long as the process


def lock_dir() -> Path:
    """Where workers on one host claim GPUs; compose mounts one shared volume here for all workers."""
    return Path(os.environ.get("HPO_GPU_LOCK_DIR") or Path(tempfile.gettempdir()) / "hpo-gpu-locks")


def trials_per_gpu(explicit: int | None = None) -> int:
    """Slots per GPU: --trials-per-gpu, then HPO_TRIALS_PER_GPU, then 1 (no GPU measurement yet says more)."""
    value = explicit if explicit is not None else env_int("HPO_TRIALS_PER_GPU", 1, least=1)
    if value < 1:
        raise HpoError(
            f"trials per GPU must be at least 1, got {value}. Set --trials-per-gpu or HPO_TRIALS_PER_GPU to 1 or more."
        )
    return value


def gpu_count() -> int:
    """GPUs to claim slots on: HPO_GPU_COUNT if set (tests and dry runs on machines without one), else CUDA's."""
    fake = env_int("HPO_GPU_COUNT", -1, least=0)
    return fake if fake >= 0 else torch.cuda.device_count()


def _try_claim(path: Path) -> bool:
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return False
    f.seek(0)
    f.truncate()
    f.write(f"{socket.gethostname()} {os.getpid()}\n")
    f.flush()
    _claims.append(f)
    return True


def claim_gpu(
    count: int, slots: int = 1, directory: Path | None = None, wait: bool = True, poll_s: float = 2.0
) -> tuple[int, int]:
    """Take a free slot of a GPU on this host: (GPU index, slot index). GPUs fill evenly: slot 0 of
    every GPU first, then slot 1, and so on.

    The claim is an flock on gpu-G-slot-S.lock; the kernel drops it when the process dies, however
    it dies, so a waiting or newly started worker takes a crashed worker's slot. With every slot
    taken, the worker waits (and says so once) rather than exit into a restart loop.
    """
    directory = directory or lock_dir()
    directory.mkdir(parents=True, exist_ok=True)
    said = False
    while True:
        for slot in range(slots):
            for gpu in range(count):
                if _try_claim(directory / f"gpu-{gpu}-slot-{slot}.lock"):
                    if said:
                        log.info("claimed GPU %d slot %d, freed by another worker", gpu, slot)
                    return gpu, slot
        if not wait:
            raise HpoError(
                f"all {count} GPUs x {slots} slots on this host are claimed by other hpo workers "
                f"(locks in {directory}). Raise --trials-per-gpu, or stop a worker."
            )
        if not said:
            log.warning(
                "all %d GPUs x %d slots on this host are claimed by other workers (locks in %s); waiting "
                "for one to free up",
                count,
                slots,
                directory,
            )
            said = True
        time.sleep(poll_s)


CPU_SHARE_ENV = "HPO_CPU_SHARE"  # set by `hpo optimize` for its local workers: the folder of their share


class CpuShare:
    """The cores of one `hpo optimize --workers N` on a CPU, split among the workers still running.

    The launcher splits the cores evenly (threads_per_worker). A worker that stops taking trials (the
    clock or the budget ended its search) leaves its cores to the others: each running worker re-reads
    the share before every epoch and trains on `cores // workers left`, so the last trial of a timed
    search does not run on one core while the other idles.

    Each worker holds an flock on worker-PID.lock in the launcher's folder, which also holds the
    number launched (`workers`). A file whose lock is free belongs to a worker that left; the kernel
    frees the lock however the process ends. A worker not yet started has no file, so it still
    counts as running: the share never oversubscribes the cores, it only grows as workers leave.
    """

    def __init__(self, folder: Path, cores: int | None = None):
        self.folder = folder
        self.cores = cores or cpu_count()
        self.launched = int((folder / "workers").read_text())
        # Locked under a private name, then renamed: another worker never sees it unlocked.
        staging = folder / f".joining-{os.getpid()}"
        self._own: IO[str] | None = open(staging, "w")
        fcntl.flock(self._own, fcntl.LOCK_EX)
        staging.rename(folder / f"worker-{os.getpid()}.lock")

    @classmethod
    def from_env(cls) -> CpuShare | None:
        """The share `hpo optimize` set up for this worker, if it did (HPO_CPU_SHARE)."""
        folder = os.environ.get(CPU_SHARE_ENV)
        return cls(Path(folder)) if folder else None

    @staticmethod
    def create(workers: int) -> Path:
        """The launcher's side: a fresh folder for `workers` workers to share (the launcher removes it)."""
        folder = Path(tempfile.mkdtemp(prefix="hpo-cpu-share-"))
        (folder / "workers").write_text(f"{workers}\n")
        return folder

    def left(self) -> int:
        """Workers that joined and have since left."""
        gone = 0
        for path in self.folder.glob("worker-*.lock"):
            try:
                probe = open(path)
            except FileNotFoundError:
                continue
            with probe:
                try:
                    fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # held: that worker runs
                fcntl.flock(probe, fcntl.LOCK_UN)
                gone += 1
        return gone

    def running(self) -> int:
        return max(1, self.launched - self.left())

    def threads(self) -> int:
        """This worker's threads now: the cores split among the workers still running."""
        return threads_per_worker(self.running(), self.cores)

    def leave(self) -> None:
        """This worker takes no more trials: its cores go to the others from their next epoch."""
        if self._own is not None:
            self._own.close()  # closing the only descriptor drops the flock
            self._own = None


def place(device: str | None = None, threads: int | None = None, claim: bool = False, slots: int = 1) -> Placement:
    """Choose the device and pin the CPU thread count.

    With no --device/HPO_DEVICE on a CUDA host: a worker (`claim`) takes a free slot of a GPU and
    waits for one if all are taken; the finalizer, predict and export use cuda:0 and take no slot.
    Elsewhere, the CPU.
    """
    wanted = device or os.environ.get("HPO_DEVICE")
    slot = None
    if wanted is None and claim and gpu_count() > 0:
        slot = claim_gpu(gpu_count(), slots)
        if torch.cuda.is_available():
            wanted = f"cuda:{slot[0]}"
        else:  # HPO_GPU_COUNT without CUDA: the slot is held, the training runs on the CPU
            log.info(
                "holding GPU %d slot %d of HPO_GPU_COUNT=%s; no CUDA here, so training runs on the CPU",
                slot[0],
                slot[1],
                os.environ.get("HPO_GPU_COUNT"),
            )
    elif wanted is None and torch.cuda.is_available():
        wanted = "cuda:0"
    dev = torch.device(wanted or "cpu")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", 0)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise HpoError(f"--device {wanted} asks for CUDA, but torch sees no GPU here. Use --device cpu.")
    n_threads = threads or env_int("HPO_THREADS", 0, least=1) or cpu_count()
    torch.set_num_threads(n_threads)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        torch.backends.cudnn.benchmark = True  # fixed input shapes per trial, so autotuning pays off
        name = f"{torch.cuda.get_device_name(dev)} ({dev})"
    else:
        name = f"cpu {platform.processor() or platform.machine()} ({n_threads} thread{'s' if n_threads > 1 else ''})"
    return Placement(dev, n_threads, name, socket.gethostname(), slot)
