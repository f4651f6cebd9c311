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

import gzip
import importlib.util
import json
import logging
import multiprocessing
import resource
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from hpo.errors import DataError, HpoError
from hpo.storage import final_dir

log = logging.getLogger(__name__)

# The notebook CNN the issue measured: two conv blocks of 32 and 64 filters, a 3136 -> 512 -> 10 head.
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

        from hpo.data import find_data_dir
        from hpo.devices import cpu_count

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


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _torchvision_root(data_dir: Path) -> Path:
    """torchvision's FashionMNIST wants uncompressed files under ROOT/FashionMNIST/raw."""
    from hpo.data import FILES, find_file

    root = Path(tempfile.mkdtemp(prefix="hpo-bench-"))
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for stems in FILES.values():
        for stem in stems:
            source = find_file(data_dir, stem)
            if source is None:
                raise DataError(f"{data_dir} has no {stem}(.gz); bench needs all four Fashion-MNIST files")
            payload = source.read_bytes()
            (raw / stem).write_bytes(gzip.decompress(payload) if payload[:2] == b"\x1f\x8b" else payload)
    return root


def _run_engine(spec: BenchSpec) -> PipelineResult:
    import torch

    from hpo import data, sources
    from hpo.config import Augment, TrainSettings
    from hpo.devices import place
    from hpo.params import TrialParams
    from hpo.train import TrainingRun, evaluate, fit, seeded_model

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
    return PipelineResult("engine", trained, seconds, trained / seconds, _peak_rss_mib(), tuple(accuracies), warmup_s)


def _run_seed(spec: BenchSpec) -> PipelineResult:
    import numpy as np
    import torch
    from torch import nn
    from torchvision import datasets, transforms

    from hpo import data
    from hpo.devices import place
    from hpo.model import DynamicCNN
    from hpo.params import TrialParams

    placement = place(spec.device, spec.threads)
    device = placement.device
    root = _torchvision_root(Path(spec.data_dir))
    transform = transforms.Compose(
        [
            transforms.RandomHorizontalFlip(),
            transforms.RandomCrop(28, padding=spec.crop_padding),
            transforms.ToTensor(),
            transforms.Normalize((data.MEAN,), (data.STD,)),
        ]
    )
    try:  # torchvision reads the files into memory here, so the copy goes at once (53 MB a run)
        full = datasets.FashionMNIST(str(root), train=True, download=False, transform=transform)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    # The same trial split as the engine, so the accuracy check compares like with like.
    train_idx, val_idx = data.stratified_split(full.targets.numpy(), 0.1, spec.seed)
    params = TrialParams.from_flat({**spec.params, "batch_size": spec.batch_size})

    def loader(indices: np.ndarray, shuffle: bool, seed: int = spec.seed) -> torch.utils.data.DataLoader:
        generator = torch.Generator().manual_seed(seed)
        return torch.utils.data.DataLoader(
            torch.utils.data.Subset(full, indices.tolist()),
            batch_size=spec.batch_size,
            shuffle=shuffle,
            num_workers=spec.num_workers,
            generator=generator,
            drop_last=True,
        )

    def fresh_model(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return DynamicCNN(params.model).to(device)

    # A warm-up pass, as the engine has.
    _seed_train(fresh_model(spec.seed), loader(train_idx[:1024], True), params, device, None)
    model = fresh_model(spec.seed)
    started = time.perf_counter()
    trained = _seed_train(model, loader(train_idx[: spec.images], True), params, device, spec.images)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    accuracies = []
    for seed in range(spec.seed, spec.seed + spec.repeats if spec.epochs else spec.seed):
        model = fresh_model(seed)
        batches = loader(train_idx, True, seed)
        for _ in range(spec.epochs):
            _seed_train(model, batches, params, device, None)
        accuracies.append(_evaluate_fp32(model, full, val_idx, device))
    return PipelineResult("seed", trained, seconds, trained / seconds, _peak_rss_mib(), tuple(accuracies))


def _seed_train(model: Any, batches: Any, params: Any, device: Any, limit: int | None) -> int:
    """The notebook's training loop: plain Adam, fp32, one host-to-device copy per batch."""
    import torch
    from torch import nn

    optimizer = torch.optim.Adam(model.parameters(), lr=params.optimizer.lr, weight_decay=params.optimizer.weight_decay)
    model.train()
    seen = 0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        seen += len(y)
        if limit is not None and seen >= limit:
            break
    return seen


def _evaluate_fp32(model, dataset, indices, device) -> float:
    """The notebook's own evaluation: no augmentation, fp32, plain loop."""
    import torch
    from torchvision import transforms

    from hpo import data

    plain = transforms.Compose([transforms.ToTensor(), transforms.Normalize((data.MEAN,), (data.STD,))])
    x = torch.stack([plain(transforms.functional.to_pil_image(dataset.data[i].numpy())) for i in indices])
    y = dataset.targets[indices]
    model.eval()
    with torch.inference_mode():
        preds = torch.cat([model(x[i : i + 1000].to(device)).argmax(1).cpu() for i in range(0, len(x), 1000)])
    return float((preds == y).float().mean())


def _child(kind: str, spec: BenchSpec, queue: multiprocessing.Queue) -> None:
    try:
        result = _run_engine(spec) if kind == "engine" else _run_seed(spec)
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

    from hpo.devices import cpu_count
    from hpo.model import DynamicCNN, count_parameters
    from hpo.params import TrialParams

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


# --------------------------------------------------------------------------- search against a fixed guess


def fixed_baseline(
    time_s: float,
    data_dir: Path,
    device: str,
    threads: int,
    settings: Any,
    augment: Any,
    seed: int = 0,
    tta: str = "none",
) -> dict[str, Any]:
    """The notebook's fixed CNN (DEFAULT_PARAMS) trained from scratch on all 60,000 training images
    for as many epochs as fit in `time_s`, with the study's [train] settings, [augment] and TTA (what
    the searched model gets), then scored once on the test split.

    The epoch count comes from timing 60 training steps after 10 untimed ones (the finalizer's timer;
    that time counts too), and is re-fitted to its own epochs through its first half as the
    finalizer's is (hpo.final.timed_replan), so the whole baseline, test pass included, ends within
    the budget it is compared at, as the search's finalizer must. (Timing one cold epoch on 5,000
    images read twice the real epoch time: the baseline trained 17 epochs in 272 s of a 600 s
    budget; without the re-fit, a slow spell of the shared machine let it train 58 epochs in 737 s
    of a 600 s budget.)
    """
    import torch

    from hpo import budget, data
    from hpo.devices import place
    from hpo.final import accuracy_figures, timed_replan
    from hpo.model import Ensemble
    from hpo.params import TrialParams
    from hpo.train import TrainingRun, evaluate, fit, seconds_per_image, seeded_model

    started = time.perf_counter()
    deadline = budget.Deadline(at=time.time() + time_s, time_s=time_s, set_at=time.time())
    placement = place(device, threads)
    images, labels = data.load_split(data_dir, "train")
    train = data.DeviceData(images, labels, placement.device)
    params = TrialParams.from_flat(DEFAULT_PARAMS)
    epoch_s = seconds_per_image(params, train, settings, augment, steps=60, warmup=10) * len(train)
    left = time_s - (time.perf_counter() - started) - 0.02 * time_s  # 2 % for the test pass and exit
    epochs = max(1, int(left // (1.05 * epoch_s)))
    model = seeded_model(params.model, seed, placement.device)
    run = TrainingRun(params.optimizer, settings, augment, epochs, seed)
    epochs = len(fit(model, train, None, run, replan=timed_replan(deadline, 0.0, epochs)))  # as re-fitted
    test_images, test_labels = data.load_split(data_dir, "test")
    test = data.DeviceData(test_images, test_labels, placement.device)
    ev = evaluate(Ensemble([model], tta), test, fast=False)
    figures = accuracy_figures(ev.predictions, torch.as_tensor(test_labels))
    return {
        "params": DEFAULT_PARAMS,
        "epochs": epochs,
        "epoch_s": round(epoch_s, 2),
        "tta": tta,
        "test_accuracy": figures["accuracy"],
        "test_ci95": figures["ci95"],
        "wall_time_s": round(time.perf_counter() - started, 1),
        "device": placement.name,
        "predictions": ev.predictions.tolist(),
    }


FIDELITY_TAG = 0x46494445  # "FIDE": the fidelity retrains' seeds, apart from every trial's and the finalizer's


def fidelity(
    study: Any,
    cfg: Any,
    data_dir: Path,
    device: str,
    threads: int,
    top: int = 5,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """The top `top` distinct finished trials by the value the search holds for them (a COMPLETE
    trial's value at the final horizon; a pruned one's at the epoch it stopped), each retrained
    with another seed for the whole horizon on the trial training split and scored on the
    validation split: does the search's ranking hold? Spearman's rho between the two columns, and
    the regret of the pick (the best retrained value less the retrained value of the trial the
    finalizer took, the best COMPLETE one). Reads no test image. `on_row` gets each row as its
    retrain ends (a retrain takes the whole horizon)."""
    import json as json_mod

    import optuna

    from hpo import data, sources
    from hpo.devices import place
    from hpo.params import TrialParams
    from hpo.stats import spearman
    from hpo.train import derive_seed, evaluate, fit, recipe, seeded_model
    from hpo.trials import value

    maximize = cfg.direction == "maximize"
    finished = study.get_trials(
        deepcopy=False, states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    )

    def held(trial: Any) -> float:
        if trial.state == optuna.trial.TrialState.COMPLETE:
            return value(trial)
        return trial.intermediate_values[max(trial.intermediate_values)]

    def reached(trial: Any) -> int:
        if trial.state == optuna.trial.TrialState.COMPLETE:
            return cfg.budget.epochs
        return max(trial.intermediate_values)

    ranked = sorted(
        (t for t in finished if t.state == optuna.trial.TrialState.COMPLETE or t.intermediate_values),
        key=held,
        reverse=maximize,
    )
    distinct: dict[str, Any] = {}
    for trial in ranked:
        distinct.setdefault(json_mod.dumps(trial.params, sort_keys=True), trial)
    finalists = list(distinct.values())[:top]
    complete = [t for t in finalists if t.state == optuna.trial.TrialState.COMPLETE]
    pick = complete[0].number if complete else None
    placement = place(device, threads)
    dataset = sources.load(cfg.data, data_dir, cfg.seed, cfg.budget.val_fraction)
    split = data.trial_data(dataset, cfg.budget.val_fraction, cfg.seed, placement.device, cfg.budget.train_subset)
    rows = []
    for trial in finalists:
        params = TrialParams.from_flat(trial.params)
        seed = derive_seed(cfg.seed, FIDELITY_TAG, trial.number)
        model = seeded_model(params.model.shaped(split.train.shape), seed, placement.device)
        started = time.perf_counter()
        fit(model, split.train, None, recipe(cfg, params, seed))
        ev = evaluate(model, split.val, cfg.train.eval_batch_size)
        retrained = ev.accuracy if cfg.metric == "val_accuracy" else ev.loss
        rows.append(
            {
                "trial": trial.number,
                "state": trial.state.name,
                "search_epochs": reached(trial),
                "search_value": held(trial),
                "retrained_value": retrained,
                "seconds": round(time.perf_counter() - started, 1),
            }
        )
        if on_row:
            on_row(rows[-1])
    rho = spearman([r["search_value"] for r in rows], [r["retrained_value"] for r in rows])
    best_retrained = (max if maximize else min)(r["retrained_value"] for r in rows) if rows else float("nan")
    picked = next((r["retrained_value"] for r in rows if r["trial"] == pick), float("nan"))
    return {
        "epochs": cfg.budget.epochs,
        "finalists": rows,
        "pick": pick,
        "spearman": rho,
        "regret": abs(best_retrained - picked),
    }


def paired(search_predictions: list[int], fixed_predictions: list[int], truth: list[int]) -> dict[str, Any]:
    """McNemar's exact test on the same test images: the images only one of the two gets right."""
    from hpo.stats import mcnemar_exact

    only_search = sum(s == t != f for s, f, t in zip(search_predictions, fixed_predictions, truth))
    only_fixed = sum(f == t != s for s, f, t in zip(search_predictions, fixed_predictions, truth))
    return {"only_search": only_search, "only_fixed": only_fixed, "p_value": mcnemar_exact(only_search, only_fixed)}


def optimize_in(
    work_dir: Path, study_file: Path, time_s: float, workers: int, data_dir: Path, device: str | None, final: bool
) -> Any:
    """`hpo optimize --time T [--final]` on `study_file` in a child process, in `work_dir` with a fresh
    SQLite storage of its own (work_dir/runs/hpo.db); returns the finished Optuna study."""
    import subprocess
    import sys

    import optuna

    from hpo import config

    name = config.load(study_file).name
    shutil.rmtree(work_dir / "runs", ignore_errors=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    args = [sys.executable, "-m", "hpo", "optimize", "--study", str(study_file.resolve())]
    args += ["--workers", str(workers), "--time", f"{time_s:g}s", "--data-dir", str(data_dir)]
    args += (["--final"] if final else []) + (["--device", device] if device else [])
    done = subprocess.run(args, cwd=work_dir, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise HpoError(f"the search (hpo optimize in {work_dir}) exited {done.returncode}: {last}")
    return optuna.load_study(study_name=name, storage=f"sqlite:///{work_dir / 'runs' / 'hpo.db'}")


def search_against_fixed(
    study_file: Path,
    time_s: float,
    workers: int,
    data_dir: Path,
    device: str | None,
    threads: int,
    work_dir: Path,
    fidelity_top: int = 5,
) -> dict[str, Any]:
    """`hpo optimize --time T --final` on `study_file` in `work_dir` (its own storage and outputs),
    then the fixed notebook CNN for the same T on the same device and threads, with the study's
    recipe, augmentation and TTA; both scored on the same test images, with McNemar's paired test.
    Then the fidelity of the search's ranking (`fidelity_top` finalists retrained; 0: skipped)."""
    import torch

    from hpo import config, data
    from hpo.inference import load_model
    from hpo.study import stored_config
    from hpo.train import evaluate

    cfg = config.load(study_file)
    if cfg.data.source != "fashion-mnist":
        raise HpoError(
            f"hpo bench --search compares a search with the notebook's fixed Fashion-MNIST CNN, but study "
            f"{cfg.name!r} trains on [data] source {cfg.data.source!r}. Give it a Fashion-MNIST study."
        )
    # Each stage's figures are kept as they come, so a run stopped part-way (the fidelity report takes
    # `fidelity_top` whole horizons) still holds what it measured.
    partial = work_dir / "bench-search.json"
    partial.unlink(missing_ok=True)
    started = time.perf_counter()
    study = optimize_in(work_dir, study_file, time_s, workers, data_dir, device, final=True)
    # The settings the study ran with: a study file with `fit_epochs` may have trained a shorter
    # horizon than it names, and the fidelity retrains train the study's.
    cfg = stored_config(study) or cfg
    out = final_dir(cfg.name, work_dir / "runs")
    searched = json.loads((out / "metrics.json").read_text())
    states = [t.state.name for t in study.get_trials(deepcopy=False)]
    result: dict[str, Any] = {
        "time_s": time_s,
        "search": {
            "study": cfg.name,
            "test_accuracy": searched["test_accuracy"],
            "test_ci95": searched["test_ci95"],
            "members": [m["trial"] for m in searched["members"] if m["trained_by"] == "final-train"],
            "trial_models": [m["trial"] for m in searched["members"] if m["trained_by"] == "search"],
            "ensemble": searched["ensemble"],
            "epochs": searched["epochs"],
            "trials": len(states),
            "complete": states.count("COMPLETE"),
            "pruned": states.count("PRUNED"),
            "wall_time_s": round(time.perf_counter() - started, 1),
        },
    }

    def keep(line: str) -> None:
        partial.write_text(json.dumps(result, indent=2))
        log.info("%s (kept in %s)", line, partial)

    keep(
        f"search: {searched['test_accuracy']:.4f} test accuracy, {len(states)} trials, "
        f"{result['search']['wall_time_s']:.0f}s; now the fixed CNN for {time_s:g}s"
    )
    fixed = fixed_baseline(
        time_s, data_dir, device or "cpu", threads, cfg.train, cfg.augment, seed=cfg.seed, tta=cfg.final.tta
    )
    # The last lines read the test split again, for the paired test only: the searched model as
    # model.pt holds it, in fp32 (the finalizer's own figure; checked equal below).
    test_images, test_labels = data.load_split(data_dir, "test")
    model, _ = load_model(out / "model.pt", cfg.name)
    test = data.DeviceData(test_images, test_labels, torch.device("cpu"))
    search_predictions = evaluate(model, test, fast=False).predictions.tolist()
    truth = [int(y) for y in test_labels]
    again = sum(p == t for p, t in zip(search_predictions, truth)) / len(truth)
    if abs(again - searched["test_accuracy"]) > 1e-3:
        raise HpoError(
            f"model.pt scores {again:.4f} on the test split, but metrics.json says {searched['test_accuracy']:.4f}"
        )
    result["fixed"] = {k: v for k, v in fixed.items() if k != "predictions"}
    result["difference"] = searched["test_accuracy"] - fixed["test_accuracy"]
    result["paired"] = paired(search_predictions, fixed.pop("predictions"), truth)
    keep(
        f"fixed CNN: {fixed['test_accuracy']:.4f} after {fixed['epochs']} epochs; McNemar p = "
        f"{result['paired']['p_value']:.3g}"
        + (f"; now {fidelity_top} fidelity retrains of {cfg.budget.epochs} epochs each" if fidelity_top else "")
    )
    if fidelity_top:
        rows: list[dict[str, Any]] = result.setdefault("fidelity_so_far", [])

        def row_done(row: dict[str, Any]) -> None:
            rows.append(row)
            keep(
                f"fidelity {len(rows)}/{fidelity_top}: trial {row['trial']} search {row['search_value']:.4f}, "
                f"retrained {row['retrained_value']:.4f}"
            )

        result["fidelity"] = fidelity(study, cfg, data_dir, device or "cpu", threads, fidelity_top, row_done)
        del result["fidelity_so_far"]
        keep(f"fidelity: Spearman's rho {result['fidelity']['spearman']:.2f}")
    return result
