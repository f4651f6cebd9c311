"""The whole GPU path in one run, one table: `bash scripts/gpu-check.sh` (see that file).

On a CUDA machine: `hpo bench` on the GPU against the notebook pipeline and the CPU engine, bf16
autocast, a short `cnn` search at 1, 2, 4 and 8 trials per GPU (trials/min, GPU utilisation and
memory), a final-train with its test accuracy, an export and a predict on the GPU, and a trial
SIGKILLed after its first checkpoint that resumes there on the GPU. Without CUDA
it runs the same steps on the CPU at a toy size, so that CI keeps the script from rotting; its
figures then say nothing about GPUs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from hpo import attrs
from hpo.learn import data
from hpo.search.trials import retry_history
from hpo.settings import config
from hpo.settings.components import Component
from hpo.settings.durations import parse_duration
from hpo.settings.writer import to_toml

HPO = [sys.executable, "-m", "hpo"]


@dataclasses.dataclass(frozen=True)
class Size:
    """How big each step is: the GPU run must fit 10 minutes, the CPU fallback about 3."""

    device: str
    bench_images: int
    bench_rounds: int
    slots: tuple[int, ...]
    trials_per_slot: int
    epochs: int
    train_subset: int
    final_epochs: int
    headline_study: str  # the study of the headline run: `hpo optimize --study S --time T --final`
    headline_time: str


GPU = Size("cuda", 20000, 3, (1, 2, 4, 8), 2, 2, 15000, 10, "cnn", "10m")
CPU = Size("cpu", 2048, 1, (1, 2), 1, 1, 1000, 1, "tiny", "90s")


def hpo(*args: str, env: dict[str, str], cwd: Path, timeout: float = 600) -> str:
    result = subprocess.run([*HPO, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise SystemExit(f"gpu-check: hpo {' '.join(args)} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return result.stdout


class GpuSampler:
    """nvidia-smi once a second in the background: the highest utilisation and memory seen."""

    def __init__(self) -> None:
        self.util, self.mem_mib, self._stop = 0, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        query = ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits", "-i", "0"]
        while not self._stop.wait(1.0):
            try:
                util, mem = subprocess.run(query, capture_output=True, text=True, timeout=10).stdout.split(",")
                self.util, self.mem_mib = max(self.util, int(util)), max(self.mem_mib, int(mem))
            except (OSError, ValueError, subprocess.SubprocessError):
                return

    def __enter__(self) -> GpuSampler:
        if shutil.which("nvidia-smi"):
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()

    def describe(self) -> str:
        return f"GPU util max {self.util} %, memory max {self.mem_mib:,} MiB" if shutil.which("nvidia-smi") else ""


def bench(size: Size, env: dict[str, str], work: Path) -> list[tuple[str, str]]:
    args = ["bench", "--json", "--images", str(size.bench_images), "--rounds", str(size.bench_rounds)]
    on_device = json.loads(hpo(*args, "--device", size.device, env=env, cwd=work))
    rows = [
        (f"bench engine on {size.device}", f"{on_device['engine']['images_per_s']:,.0f} img/s"),
        (f"bench notebook pipeline on {size.device}", f"{on_device['seed']['images_per_s']:,.0f} img/s"),
        ("bench speedup (engine / notebook)", f"{on_device['speedup']:.2f}x"),
    ]
    if size.device == "cuda":  # the CPU engine as the baseline, same run, same machine
        on_cpu = json.loads(hpo(*args, "--device", "cpu", env=env, cwd=work))
        ratio = on_device["engine"]["images_per_s"] / on_cpu["engine"]["images_per_s"]
        rows.append(
            (
                f"bench engine on the CPU ({on_cpu['spec']['threads']} threads)",
                f"{on_cpu['engine']['images_per_s']:,.0f} img/s; GPU {ratio:.1f}x",
            )
        )
    return rows


def bf16(size: Size) -> tuple[str, str]:
    from hpo.learn.devices import autocast_dtype
    from hpo.learn.model import DynamicCNN
    from hpo.learn.params import TrialParams

    device = torch.device(size.device)
    dtype = autocast_dtype(device)
    model = DynamicCNN(TrialParams.from_flat(dict(config.load("cnn").warm_start.params[0])).model).to(device)
    x = torch.randn(256, 1, 28, 28, device=device)
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        out = model(x)
        loss = torch.nn.functional.cross_entropy(out, torch.zeros(256, dtype=torch.long, device=device))
    loss.backward()
    finite = bool(torch.isfinite(loss)) and all(torch.isfinite(p.grad).all() for p in model.parameters())
    return "bf16 autocast", f"{'on' if dtype else 'off (fp32)'}: logits {out.dtype}, loss and grads finite: {finite}"


def slot_study(size: Size, slots: int, directory: Path) -> Path:
    cfg = config.load("cnn")
    cfg = dataclasses.replace(
        cfg,
        name=f"gpu-check-{slots}",
        budget=dataclasses.replace(
            cfg.budget, n_trials=slots * size.trials_per_slot, epochs=size.epochs, train_subset=size.train_subset
        ),
        sampler=Component("random"),
        pruner=Component("none"),  # every trial trains its epochs, so the rates compare
        final=dataclasses.replace(cfg.final, epochs=size.final_epochs, ensemble=1),
    )
    path = directory / f"gpu-check-{slots}.toml"
    path.write_text(to_toml(cfg))
    return path


def search(size: Size, slots: int, env: dict[str, str], work: Path) -> tuple[str, str]:
    study = slot_study(size, slots, work)
    started = time.perf_counter()
    with GpuSampler() as gpu:
        hpo(
            "optimize",
            "--study",
            str(study),
            "--workers",
            str(slots),
            env={**env, "HPO_TRIALS_PER_GPU": str(slots)},
            cwd=work,
        )
    wall = time.perf_counter() - started
    import optuna

    trials = optuna.load_study(study_name=f"gpu-check-{slots}", storage=env["HPO_STORAGE"]).trials
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    span = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
    devices = sorted({str(t.user_attrs.get(attrs.DEVICE)) for t in done})
    figure = (
        f"{len(done) / span * 60:.1f} trials/min over the trials ({len(done)} x {size.epochs} epochs in {span:.0f} s; "
        f"{wall:.0f} s with start-up), on {', '.join(devices)}"
    )
    return f"search, {slots} trial(s) per GPU", f"{figure}; {gpu.describe()}".rstrip("; ")


def resume(size: Size, env: dict[str, str], work: Path) -> tuple[str, str]:
    """A worker SIGKILLed after its first checkpoint on the device; a second worker reaps its trial,
    and the retry must resume from that epoch on the same device (train.restore_random_state)."""
    import signal

    import optuna

    cfg = config.load("cnn")
    cfg = dataclasses.replace(
        cfg,
        name="gpu-check-resume",
        budget=dataclasses.replace(cfg.budget, n_trials=1, epochs=3, train_subset=size.train_subset, time_s=None),
        sampler=Component("random"),
        pruner=Component("none"),
        warm_start=config.WarmStart(),
    )
    path = work / "gpu-check-resume.toml"
    path.write_text(to_toml(cfg))
    env = {**env, "HPO_HEARTBEAT_INTERVAL": "1", "HPO_GRACE_PERIOD": "3", "HPO_ARTIFACTS": str(work / "artifacts")}
    command = [*HPO, "worker", "--study", str(path)]
    log = (work / "resume-worker-a.log").open("w")
    first = subprocess.Popen(command, env=env, cwd=work, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    killed = None
    while killed is None:
        if time.monotonic() > deadline or first.poll() is not None:
            first.kill()
            raise SystemExit(
                f"no checkpoint before the worker ended:\n{(work / 'resume-worker-a.log').read_text()[-2000:]}"
            )
        time.sleep(0.5)
        try:
            running = optuna.load_study(study_name=cfg.name, storage=env["HPO_STORAGE"]).get_trials(
                states=(optuna.trial.TrialState.RUNNING,)
            )
        except KeyError:
            continue
        killed = next((t for t in running if t.user_attrs.get(attrs.CHECKPOINT)), None)
    first.send_signal(signal.SIGKILL)
    first.wait()
    hpo("worker", "--study", str(path), env=env, cwd=work, timeout=600)
    trials = optuna.load_study(study_name=cfg.name, storage=env["HPO_STORAGE"]).trials
    retry = next(t for t in trials if retry_history(t)[-1:] == [killed.number])
    saved = killed.user_attrs[attrs.CHECKPOINT]["epoch"]
    resumed = retry.user_attrs.get(attrs.RESUMED_FROM)
    if retry.state != optuna.trial.TrialState.COMPLETE or resumed is None or resumed < saved:
        raise SystemExit(f"the retry did not resume: {retry.state.name}, resumed_from_epoch {resumed}, saved {saved}")
    return (
        "resume after SIGKILL",
        f"trial {killed.number} killed after its epoch-{saved} checkpoint on {killed.user_attrs['device']}; retry "
        f"{retry.number} resumed from epoch {resumed} on {retry.user_attrs['device']} "
        f"(exact: {retry.user_attrs.get('resumed_exactly')}), value {retry.value:.4f}",
    )


def headline(size: Size, env: dict[str, str], work: Path, time_budget: str) -> tuple[str, str]:
    """The figure a user of the GPU gets: the shipped study searched and final-trained in one timed
    run, as the README gives it (on the CPU fallback, the tiny study for a toy time)."""
    import optuna

    home = work / "headline"
    home.mkdir()
    started = time.perf_counter()
    workers = str(torch.cuda.device_count()) if size.device == "cuda" else "2"
    run_env = {k: v for k, v in env.items() if k != "HPO_STORAGE"}  # its own runs/ in its own directory
    hpo(
        "optimize", "--study", size.headline_study, "--workers", workers, "--time", time_budget, "--final",
        env=run_env, cwd=home, timeout=parse_duration(time_budget) * 1.2 + 120,
    )  # fmt: skip
    wall = time.perf_counter() - started
    name = size.headline_study
    metrics = json.loads((home / "runs" / name / "final" / "metrics.json").read_text())
    trials = optuna.load_study(study_name=name, storage=f"sqlite:///{home / 'runs' / 'hpo.db'}").trials
    states = [t.state.name for t in trials]
    low, high = metrics["test_ci95"]
    ensemble = metrics["ensemble"]
    searched = f" + {ensemble['from_search']} trial model(s)" if ensemble["from_search"] else ""
    return (
        f"hpo optimize --study {name} --time {time_budget} --final",
        f"test accuracy {100 * metrics['test_accuracy']:.2f} % ({100 * low:.2f}-{100 * high:.2f}), "
        f"{len(trials)} trials ({states.count('COMPLETE')} complete, {states.count('PRUNED')} pruned), "
        f"{ensemble['trained']} member(s) x {metrics['epochs']} epochs{searched}, {wall:.0f} s",
    )


def final_and_serving(size: Size, env: dict[str, str], work: Path) -> list[tuple[str, str]]:
    study = str(work / "gpu-check-1.toml")
    started = time.perf_counter()
    hpo("final-train", "--study", study, "--device", size.device, env=env, cwd=work, timeout=900)
    metrics = json.loads((work / "runs" / "gpu-check-1" / "final" / "metrics.json").read_text())
    rows = [
        (
            f"final-train ({size.final_epochs} epochs)",
            f"test accuracy {metrics['test_accuracy'] * 100:.2f} % in {time.perf_counter() - started:.0f} s",
        )
    ]
    env = {**env, "HPO_DEVICE": size.device}
    exported = hpo("export", "--study", study, "--format", "torchscript", env=env, cwd=work).strip().splitlines()
    rows.append(("export (torchscript, checked on the test split)", exported[-1][:110]))
    from PIL import Image

    images, labels = data.load_split(data.find_data_dir(), "test")
    picture = work / "test-0.png"
    Image.fromarray(images[0]).save(picture)
    answer = json.loads(
        hpo("predict", "--study", study, "--device", size.device, "--json", str(picture), env=env, cwd=work)
    )
    truth = data.CLASSES[int(labels[0])]
    rows.append((f"predict on {size.device}", f"{answer['label']} ({answer['probability']:.3f}); label {truth}"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="the CPU fallback even where CUDA is present")
    parser.add_argument("--work", type=Path, default=Path("runs/gpu-check"), help="scratch directory (emptied)")
    parser.add_argument(
        "--only",
        choices=("all", "checks", "headline"),
        default="all",
        help="checks: every step but the headline run; headline: only `hpo optimize --study cnn --time 10m "
        "--final` (for a machine whose commands may run 10 minutes each: run the two apart)",
    )
    parser.add_argument("--headline-time", default=None, help="the headline run's --time (default 10m on a GPU)")
    options = parser.parse_args()
    size = CPU if options.cpu or not torch.cuda.is_available() else GPU
    work = options.work.resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = {**os.environ, "HPO_STORAGE": f"sqlite:///{work / 'runs' / 'hpo.db'}", "HPO_PROGRESS": "log"}
    env.pop("HPO_DEVICE", None)  # on a GPU, workers claim their slots themselves
    if size.device == "cpu":
        env["HPO_DEVICE"] = "cpu"
    started = time.perf_counter()
    machine = torch.cuda.get_device_name(0) if size.device == "cuda" else f"CPU fallback, {os.cpu_count()} cores"
    rows = [("machine", f"{machine}; torch {torch.__version__}")]
    # Each step on its own: one failing step (a first run on a new GPU, say) leaves the others' figures.
    steps = [
        ("bench", lambda: bench(size, env, work)),
        ("bf16 autocast", lambda: [bf16(size)]),
        *((f"search, {n} trial(s) per GPU", lambda n=n: [search(size, n, env, work)]) for n in size.slots),
        ("final-train, export, predict", lambda: final_and_serving(size, env, work)),
        ("resume after SIGKILL", lambda: [resume(size, env, work)]),
    ]
    run_headline = ("headline", lambda: [headline(size, env, work, options.headline_time or size.headline_time)])
    steps = {"all": [*steps, run_headline], "checks": steps, "headline": [run_headline]}[options.only]
    failed = 0
    for name, step in steps:
        try:
            rows += step()
        except (Exception, SystemExit) as e:  # SystemExit: an hpo command that exited non-zero
            failed += 1
            rows.append(
                (name, f"FAILED: {str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__}")
            )
            print(f"gpu-check: {name} failed:\n{e}", file=sys.stderr)
    rows.append(("gpu-check wall time", f"{time.perf_counter() - started:.0f} s"))
    width = max(len(name) for name, _ in rows)
    print(f"| {'check':<{width}} | result |\n|{'-' * (width + 2)}|--------|")
    for name, value in rows:
        print(f"| {name:<{width}} | {value} |")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
