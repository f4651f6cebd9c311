"""`hpo bench`: our training engine against the pipeline a typical Fashion-MNIST notebook uses.

Both pipelines train the same DynamicCNN configuration at the same batch size with the same kind
of augmentation (random crop with padding + horizontal flip), each in a fresh process so that its
peak memory is its own:

- engine: `train.fit` on the device-resident uint8 tensors, batched augmentation, bf16 autocast
  where the hardware has it, channels_last (exactly what a trial runs);
- seed: `torchvision.datasets.FashionMNIST` with per-sample PIL transforms
  (RandomHorizontalFlip, RandomCrop(28, padding), ToTensor, Normalize), a `DataLoader`, fp32.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import multiprocessing
import resource
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from hpo.errors import HpoError

log = logging.getLogger(__name__)

# The fixed notebook CNN: two conv blocks of 32 and 64 filters, a 3136 -> 512 -> 10 head.
DEFAULT_PARAMS: dict[str, Any] = {
    "n_conv": 2,
    "filters_0": 32,
    "filters_1": 64,
    "kernel_size": 3,
    "n_fc": 1,
    "fc_size": 512,
    "dropout": 0.25,
    "optimizer": "adam",
    "lr": 1e-3,
    "batch_size": 64,
    "weight_decay": 0.0,
}


def params_for(best: dict[str, Any], overrides_json: str | None) -> dict[str, Any]:
    """The configuration `hpo bench` times: the notebook CNN, then a study's best trial's
    parameters, then `--params` overrides (JSON)."""
    params = {**DEFAULT_PARAMS, **best}
    if overrides_json:
        try:
            params.update(json.loads(overrides_json))
        except json.JSONDecodeError as e:
            raise HpoError(f"--params is not valid JSON ({e}). Example: --params '{{\"fc_size\": 256}}'") from e
    return params


@dataclass(frozen=True)
class BenchSpec:
    params: dict[str, Any]
    data_dir: str
    images: int  # training images timed per pipeline
    batch_size: int
    crop_padding: int  # pixels
    device: str
    threads: int
    epochs: int = 0  # > 0: also train this many epochs on the trial split and report val accuracy
    repeats: int = 1  # seeds for the accuracy check (one run's seed noise is about a point)
    seed: int = 0
    num_workers: int = 0  # DataLoader workers of the seed pipeline
    compile: bool = False  # torch.compile the engine's model

    @classmethod
    def from_options(
        cls,
        params: dict[str, Any],
        data_dir: str | None,
        device: str | None,
        threads: int | None,
        use_compile: bool,
        **options: Any,
    ) -> BenchSpec:
        """`hpo bench`'s options, with the data set found and the device and threads defaulted."""
        import torch

        from hpo.learn.data import find_data_dir
        from hpo.learn.devices import cpu_count

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        directory = str(find_data_dir(data_dir))
        threads = threads or cpu_count()
        return cls(params=params, data_dir=directory, device=device, threads=threads, compile=use_compile, **options)


@dataclass(frozen=True)
class PipelineResult:
    pipeline: str
    images: int
    seconds: float
    images_per_s: float
    peak_rss_mib: float
    val_accuracies: tuple[float, ...] = ()  # one per seed of the accuracy check
    warmup_s: float = 0.0  # the 1,024-image warm-up pass, torch.compile's compilation included


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _run_engine(spec: BenchSpec) -> PipelineResult:
    import torch

    from hpo.learn import data, sources
    from hpo.learn.devices import place
    from hpo.learn.params import TrialParams
    from hpo.learn.train import TrainingRun, evaluate, fit, seeded_model
    from hpo.settings.config import Augment, TrainSettings

    placement = place(spec.device, spec.threads)
    params = TrialParams.from_flat({**spec.params, "batch_size": spec.batch_size})
    trial = data.trial_data(sources.fashion_mnist(Path(spec.data_dir)), 0.1, spec.seed, placement.device)
    augment = Augment(crop_padding=spec.crop_padding, hflip=True)
    run = TrainingRun(params.optimizer, TrainSettings(schedule="constant", compile=spec.compile), augment, 1, spec.seed)
    timed, warm = trial.train.head(spec.images), trial.train.head(1024)
    warm_started = time.perf_counter()
    fit(seeded_model(params.model, spec.seed, placement.device), warm, None, run)
    warmup_s = time.perf_counter() - warm_started
    model = seeded_model(params.model, spec.seed, placement.device)
    if placement.device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    fit(model, timed, None, run)  # reads the loss once: a sync point
    seconds = time.perf_counter() - started
    trained = (len(timed) // spec.batch_size) * spec.batch_size
    accuracies = []
    for seed in range(spec.seed, spec.seed + spec.repeats if spec.epochs else spec.seed):
        model = seeded_model(params.model, seed, placement.device)
        fit(model, trial.train, None, replace(run, epochs=spec.epochs, seed=seed))
        accuracies.append(evaluate(model, trial.val).accuracy)
    return PipelineResult("engine", trained, seconds, trained / seconds, peak_rss_mib(), tuple(accuracies), warmup_s)


def _child(kind: str, spec: BenchSpec, queue: multiprocessing.Queue) -> None:
    try:
        from hpo.bench.notebook import run_seed

        result = _run_engine(spec) if kind == "engine" else run_seed(spec)
        queue.put(("ok", asdict(result)))
    except BaseException as e:  # report, do not hang the parent
        queue.put(("error", f"{type(e).__name__}: {e}"))


def _in_processes(kind: str, specs: list[BenchSpec]) -> list[dict[str, Any]]:
    """Run one pipeline per spec, all at the same time, each in a fresh process."""
    from hpo.errors import HpoError

    ctx = multiprocessing.get_context("spawn")
    queues = [ctx.Queue() for _ in specs]
    procs = [ctx.Process(target=_child, args=(kind, spec, q)) for spec, q in zip(specs, queues)]
    for proc in procs:
        proc.start()
    outcomes = [q.get() for q in queues]
    for proc in procs:
        proc.join()
    for status, payload in outcomes:
        if status != "ok":
            raise HpoError(f"the {kind} pipeline failed: {payload}")
    return [payload for _, payload in outcomes]


def run(spec: BenchSpec, workers: int = 0, rounds: int = 3) -> dict[str, Any]:
    """Both pipelines, each in a fresh process, in `rounds` interleaved rounds (engine then seed,
    then seed then engine, ...): a shared machine's slow spells hit both, and the medians are
    compared. The accuracy check (`epochs`) runs in the first round only. With `workers`, also that
    many engine processes at once, first with cores/workers threads each, then each with all cores."""
    import statistics
    from dataclasses import replace

    per_round: list[dict[str, dict[str, Any]]] = []
    for index in range(rounds):
        this = spec if index == 0 else replace(spec, epochs=0)
        order = ("engine", "seed") if index % 2 == 0 else ("seed", "engine")
        per_round.append({kind: _in_processes(kind, [this])[0] for kind in order})

    def combined(kind: str) -> dict[str, Any]:
        rates = [one[kind]["images_per_s"] for one in per_round]
        return {
            **per_round[0][kind],
            "images_per_s": statistics.median(rates),
            "rounds_images_per_s": rates,
            "peak_rss_mib": max(one[kind]["peak_rss_mib"] for one in per_round),
        }

    engine, seed = combined("engine"), combined("seed")
    result: dict[str, Any] = {
        "spec": {k: v for k, v in asdict(spec).items() if k != "data_dir"},
        "rounds": rounds,
        "engine": engine,
        "seed": seed,
        "speedup": engine["images_per_s"] / seed["images_per_s"],
        "round_speedups": [one["engine"]["images_per_s"] / one["seed"]["images_per_s"] for one in per_round],
    }
    if workers:
        quiet = replace(spec, epochs=0)
        split = _in_processes("engine", [replace(quiet, threads=max(1, spec.threads // workers))] * workers)
        over = _in_processes("engine", [quiet] * workers)
        result["parallel"] = {
            "workers": workers,
            "split_threads": max(1, spec.threads // workers),
            "split_images_per_s": sum(one["images_per_s"] for one in split),
            "oversubscribed_images_per_s": sum(one["images_per_s"] for one in over),
            "single_worker_images_per_s": engine["images_per_s"],
        }
    return result


def measure(spec: BenchSpec, workers: int = 0, rounds: int = 3) -> dict[str, Any]:
    """`run`, with the model's size and the machine it ran on: what `hpo bench` prints."""
    import datetime
    import platform

    import torch

    from hpo.learn.devices import cpu_count
    from hpo.learn.model import DynamicCNN, count_parameters
    from hpo.learn.params import TrialParams

    if importlib.util.find_spec("torchvision") is None:  # the notebook pipeline is torchvision's
        raise HpoError(
            "hpo bench compares against the notebook pipeline, which needs torchvision: "
            "pip install 'hpo-service[bench]'."
        )
    result = run(spec, workers, rounds)
    result["model_parameters"] = count_parameters(DynamicCNN(TrialParams.from_flat(spec.params).model))
    result["machine"] = {
        "cpu": platform.processor() or platform.machine(),
        "cores": cpu_count(),
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "gpu": torch.cuda.get_device_name(0) if spec.device.startswith("cuda") else None,
    }
    return result


def describe(result: dict[str, Any]) -> str:
    """`measure`'s result as `hpo bench` prints it: every round, the medians and their ratio."""
    spec, rounds = result["spec"], result["rounds"]
    lines = [
        f"hpo bench: DynamicCNN with {result['model_parameters']:,} parameters, batch {spec['batch_size']}, "
        f"crop (padding {spec['crop_padding']}) + flip, {spec['images']:,} images, {spec['device']} "
        f"({spec['threads']} threads), torch {result['machine']['torch']}"
    ]
    for kind in ("engine", "seed"):
        figures = result[kind]
        accs = figures["val_accuracies"]
        acc = (
            (
                f"   val acc after {spec['epochs']} epochs: mean {sum(accs) / len(accs):.4f} over seeds "
                f"{', '.join(f'{a:.4f}' for a in accs)}"
            )
            if accs
            else ""
        )
        warm = f"   warm-up {figures['warmup_s']:.1f}s" if kind == "engine" and spec["compile"] else ""
        each = ", ".join(f"{x:,.0f}" for x in figures["rounds_images_per_s"])
        lines.append(
            f"  {kind:<7}{figures['images_per_s']:>9,.0f} img/s  (median of {rounds} rounds: {each})   peak RSS "
            f"{figures['peak_rss_mib']:,.0f} MiB{acc}{warm}"
        )
    lines.append(
        f"  speedup {result['speedup']:.2f}x  (median engine / median seed; per round: "
        f"{', '.join(f'{x:.2f}x' for x in result['round_speedups'])})"
    )
    if spec["epochs"]:
        repeats = spec["repeats"]
        gap = sum(result["engine"]["val_accuracies"]) / repeats - sum(result["seed"]["val_accuracies"]) / repeats
        lines.append(f"  validation accuracy, engine minus seed: {gap * 100:+.2f} points (mean of {repeats} seeds)")
    if "parallel" in result:
        parallel = result["parallel"]
        lines.append(
            f"  {parallel['workers']} engine workers at once, {parallel['split_threads']} thread(s) each: "
            f"{parallel['split_images_per_s']:,.0f} img/s in total "
            f"({parallel['split_images_per_s'] / parallel['single_worker_images_per_s']:.2f}x one worker on "
            f"{spec['threads']} threads); each on all {spec['threads']} threads (oversubscribed): "
            f"{parallel['oversubscribed_images_per_s']:,.0f} img/s"
        )
    return "\n".join(lines)
