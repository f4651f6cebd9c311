"""Learning-rate schedule probe on the probe split: under which schedule do a trial's early epochs
rank configurations as its last epoch does, and which trains the best models at the horizon?

Every trial's schedule spans the whole horizon (`[budget] epochs`), so a pruner that compares
trials at epoch k compares them part-way down that schedule. Li et al. (ICLR 2020, budgeted
training) anneal within each budget; this probe measures, for each `[train] schedule`, Spearman's
rho between the validation accuracy at each epoch and at the last, across configurations drawn at
random from a study's space, each trained from the same initial weights under every schedule.

The probe split (family.py) holds 6,000 images out of the study's own training part, so nothing
here reads the validation split that ranks the study's trials, nor the test split.

Usage: .venv/bin/python scripts/recipe-probes/schedules.py STUDY CONFIGS IMAGES [SCHEDULE ...]
       (the study's horizon, recipe and augmentation; IMAGES of the probe split's 48,000 training
       images, stratified; two processes of one thread; default schedules: cosine onecycle constant)
"""

import multiprocessing
import statistics
import sys
import time
from dataclasses import replace

import numpy as np
import optuna

from hpo.learn import data
from hpo.learn.devices import place
from hpo.learn.params import TrialParams
from hpo.learn.train import TrainingRun, fit, seeded_model
from hpo.results.stats import spearman
from hpo.search import space
from hpo.settings import config

_split: data.TrialData | None = None


def _load(images: int) -> None:
    """Each process's probe split, loaded once: IMAGES of its training part, and its 6,000 held out."""
    from family import probe_split

    global _split
    placement = place("cpu", 1)
    split = probe_split(placement.device)
    keep = np.arange(len(split.train.y))
    if images < len(keep):
        _, keep = data.stratified_split(split.train.y.numpy(), images / len(keep), 11)
    _split = data.TrialData(data.DeviceData(split.train.x[keep], split.train.y[keep], placement.device), split.val)


def _train(job: tuple[str, int, dict, int, str]) -> tuple[str, int, list[float], float]:
    study, index, flat, epochs, schedule = job
    assert _split is not None
    cfg = config.load(study)
    params = TrialParams.from_flat(flat)
    model = seeded_model(params.model, index + 1, _split.train.device)  # the same weights under every schedule
    run = TrainingRun(params.optimizer, replace(cfg.train, schedule=schedule), cfg.augment, epochs, index + 1)
    started = time.perf_counter()
    history = fit(model, _split.train, _split.val, run)
    values = [s.val_accuracy for s in history]
    print(f"config {index} {schedule:<8} " + " ".join(f"{v:.4f}" for v in values), flush=True)
    return schedule, index, values, time.perf_counter() - started


def draws(cfg: config.StudyConfig, n: int) -> list[dict]:
    """`n` configurations drawn at random (seed 0) from the study's space, as flat parameters."""
    sampler = optuna.samplers.RandomSampler(seed=0)
    study = optuna.create_study(sampler=sampler)
    return [space.suggest(study.ask(), cfg.space).flat() for _ in range(n)]


def main() -> None:
    study, n, images = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    schedules = sys.argv[4:] or ["cosine", "onecycle", "constant"]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    cfg = config.load(study)
    epochs = cfg.budget.epochs
    flats = draws(cfg, n)
    jobs = [(study, i, flat, epochs, s) for i, flat in enumerate(flats) for s in schedules]
    print(f"{study}: {n} configurations x {len(schedules)} schedules, {epochs} epochs on {images} probe images")
    started = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(2, initializer=_load, initargs=(images,)) as pool:
        results = pool.map(_train, jobs, chunksize=1)
    curves = {(s, i): v for s, i, v, _ in results}
    median_s = statistics.median(r[3] for r in results)
    print(f"trained in {time.perf_counter() - started:.0f}s; median run {median_s:.0f}s")
    for s in schedules:
        last = [curves[(s, i)][-1] for i in range(n)]
        rhos = [spearman([curves[(s, i)][k] for i in range(n)], last) for k in range(epochs - 1)]
        best_at = [int(np.argmax([curves[(s, i)][k] for i in range(n)])) for k in range(epochs)]
        regret = [100 * (max(last) - last[b]) for b in best_at[:-1]]
        print(
            f"SUMMARY {s:<8} rho(epoch k, last) "
            + " ".join(f"k={k + 1}:{r:+.2f}" for k, r in enumerate(rhos))
            + " | regret of epoch k's best (points) "
            + " ".join(f"{r:.2f}" for r in regret)
            + f" | last epoch mean {statistics.fmean(last):.4f} best {max(last):.4f}"
        )
    for i, flat in enumerate(flats):
        print(f"config {i}: {flat}")


if __name__ == "__main__":
    main()
