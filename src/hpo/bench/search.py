"""`hpo bench --search T`: the searched model against the fixed notebook CNN trained for the same
time, on the same device, threads, augmentation and TTA; both scored once on the test split, with
McNemar's exact test on the images only one of them gets right, and the fidelity report (the top
finalists retrained at the final horizon and scored on validation, with Spearman's rho and the
regret of the pick)."""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpo.bench.pipelines import DEFAULT_PARAMS
from hpo.errors import HpoError
from hpo.paths import final_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Setup:
    """What every run of a benchmark shares: the study file, the time each run gets, the local
    workers of a search, this host's data, device and threads, and the folder the runs go to."""

    study_file: Path
    time_s: float
    workers: int
    data_dir: Path
    device: str | None
    threads: int
    work_dir: Path


def fixed_baseline(setup: Setup, cfg: Any) -> dict[str, Any]:
    """The notebook's fixed CNN (DEFAULT_PARAMS) trained from scratch on all 60,000 training images
    for as many epochs as fit in `setup.time_s`, with the study's [train] settings, [augment], seed
    and TTA (what the searched model gets), then scored once on the test split.

    The epoch count comes from timing 60 training steps after 10 untimed ones (the finalizer's timer;
    that time counts too), and is re-fitted to its own epochs as the finalizer's is
    (hpo.search.final_epochs.timed_replan), so the whole baseline, test pass included, ends within
    the budget it is compared at, as the search's finalizer must. The timing is warm: a cold epoch
    reads about twice the real time (docs/performance.md, "Search against a fixed guess").
    """
    import torch

    from hpo.learn import data
    from hpo.learn.devices import place
    from hpo.learn.model import Ensemble
    from hpo.learn.params import TrialParams
    from hpo.learn.train import Hooks, TrainingRun, evaluate, fit, seconds_per_image, seeded_model
    from hpo.results.scoring import accuracy_figures
    from hpo.search import budget, final_epochs

    started = time.perf_counter()
    time_s, seed, tta = setup.time_s, cfg.seed, cfg.final.tta
    deadline = budget.Deadline(at=time.time() + time_s, time_s=time_s, set_at=time.time())
    placement = place(setup.device or "cpu", setup.threads)
    images, labels = data.load_split(setup.data_dir, "train")
    train = data.DeviceData(images, labels, placement.device)
    params = TrialParams.from_flat(DEFAULT_PARAMS)
    epoch_s = seconds_per_image(params, train, cfg.train, cfg.augment, steps=60, warmup=10) * len(train)
    left = time_s - (time.perf_counter() - started) - 0.02 * time_s  # 2 % for the test pass and exit
    epochs = max(1, int(left // (1.05 * epoch_s)))
    model = seeded_model(params.model, seed, placement.device)
    run = TrainingRun(params.optimizer, cfg.train, cfg.augment, epochs, seed)
    replan = final_epochs.timed_replan(deadline, 0.0, epochs)
    epochs = len(fit(model, train, None, run, Hooks(replan=replan)))  # as re-fitted
    test_images, test_labels = data.load_split(setup.data_dir, "test")
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
    study: Any, cfg: Any, setup: Setup, top: int = 5, on_row: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """The top `top` distinct finished trials by the value the search holds for them (a COMPLETE
    trial's value at the final horizon; a pruned one's at the epoch it stopped), each retrained
    with another seed for the whole horizon on the trial training split and scored on the
    validation split: does the search's ranking hold? Spearman's rho between the two columns, and
    the regret of the pick (the best retrained value less the retrained value of the trial the
    finalizer took, the best COMPLETE one). Reads no test image. `on_row` gets each row as its
    retrain ends (a retrain takes the whole horizon)."""

    import optuna

    from hpo.learn import data, sources
    from hpo.learn.devices import place
    from hpo.results.stats import spearman

    maximize = cfg.direction == "maximize"
    finalists = _finalists(study, cfg, top)
    complete = [t for t in finalists if t.state == optuna.trial.TrialState.COMPLETE]
    pick = complete[0].number if complete else None
    placement = place(setup.device or "cpu", setup.threads)
    dataset = sources.load(cfg.data, setup.data_dir, cfg.seed, cfg.budget.val_fraction)
    split = data.trial_data(dataset, cfg.budget.val_fraction, cfg.seed, placement.device, cfg.budget.train_subset)
    rows = []
    for trial in finalists:
        rows.append(_retrain_row(trial, cfg, split, placement.device))
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


def _retrain_row(trial: Any, cfg: Any, split: Any, device: Any) -> dict[str, Any]:
    """One finalist retrained with the fidelity seed for the whole horizon on the trial split, scored on validation."""
    from hpo.learn.params import TrialParams
    from hpo.learn.seeds import derive_seed
    from hpo.learn.train import evaluate, fit, recipe, seeded_model

    params = TrialParams.from_flat(trial.params)
    seed = derive_seed(cfg.seed, FIDELITY_TAG, trial.number)
    model = seeded_model(params.model.shaped(split.train.shape), seed, device)
    started = time.perf_counter()
    fit(model, split.train, None, recipe(cfg, params, seed))
    ev = evaluate(model, split.val, cfg.train.eval_batch_size)
    return {
        "trial": trial.number,
        "state": trial.state.name,
        "search_epochs": _reached(trial, cfg),
        "search_value": _held(trial),
        "retrained_value": ev.accuracy if cfg.metric == "val_accuracy" else ev.loss,
        "seconds": round(time.perf_counter() - started, 1),
    }


def _held(trial: Any) -> float:
    """The value the search holds for a finished trial: a COMPLETE one's, a pruned one's last report."""
    import optuna

    if trial.state == optuna.trial.TrialState.COMPLETE:
        from hpo.search.trials import value

        return value(trial)
    return trial.intermediate_values[max(trial.intermediate_values)]


def _reached(trial: Any, cfg: Any) -> int:
    """The epochs a finished trial trained: the horizon, or the epoch it was pruned at."""
    import optuna

    return cfg.budget.epochs if trial.state == optuna.trial.TrialState.COMPLETE else max(trial.intermediate_values)


def _finalists(study: Any, cfg: Any, top: int) -> list[Any]:
    """The `top` distinct finished trials by the value the search holds for them, best first."""
    import json

    import optuna

    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    ranked = sorted(
        (t for t in study.get_trials(deepcopy=False, states=states) if t.state == states[0] or t.intermediate_values),
        key=_held,
        reverse=cfg.direction == "maximize",
    )
    distinct: dict[str, Any] = {}
    for trial in ranked:
        distinct.setdefault(json.dumps(trial.params, sort_keys=True), trial)
    return list(distinct.values())[:top]


def paired(search_predictions: list[int], fixed_predictions: list[int], truth: list[int]) -> dict[str, Any]:
    """McNemar's exact test on the same test images: the images only one of the two gets right."""
    from hpo.results.stats import mcnemar_exact

    only_search = sum(s == t != f for s, f, t in zip(search_predictions, fixed_predictions, truth))
    only_fixed = sum(f == t != s for s, f, t in zip(search_predictions, fixed_predictions, truth))
    return {"only_search": only_search, "only_fixed": only_fixed, "p_value": mcnemar_exact(only_search, only_fixed)}


def optimize_in(setup: Setup, final: bool) -> Any:
    """`hpo optimize --time T [--final]` on the setup's study file in a child process, in its
    `work_dir` with a fresh SQLite storage of its own (work_dir/runs/hpo.db); returns the finished
    Optuna study."""
    import subprocess
    import sys

    import optuna

    from hpo.settings import config

    work_dir, device = setup.work_dir, setup.device
    name = config.load(setup.study_file).name
    shutil.rmtree(work_dir / "runs", ignore_errors=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    args = [sys.executable, "-m", "hpo", "optimize", "--study", str(setup.study_file.resolve())]
    args += ["--workers", str(setup.workers), "--time", f"{setup.time_s:g}s", "--data-dir", str(setup.data_dir)]
    args += (["--final"] if final else []) + (["--device", device] if device else [])
    done = subprocess.run(args, cwd=work_dir, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise HpoError(f"the search (hpo optimize in {work_dir}) exited {done.returncode}: {last}")
    return optuna.load_study(study_name=name, storage=f"sqlite:///{work_dir / 'runs' / 'hpo.db'}")


def search_against_fixed(setup: Setup, fidelity_top: int = 5) -> dict[str, Any]:
    """`hpo optimize --time T --final` on the study file in `setup.work_dir` (its own storage and
    outputs), then the fixed notebook CNN for the same T on the same device and threads, with the
    study's recipe, augmentation and TTA; both scored on the same test images, with McNemar's paired
    test. Then the fidelity of the search's ranking (`fidelity_top` finalists retrained; 0: skipped).

    Each stage's figures are kept in work_dir/bench-search.json as it ends, so a run stopped
    part-way (the fidelity report takes `fidelity_top` whole horizons) still holds what it measured."""
    from hpo.settings import config

    cfg = config.load(setup.study_file)
    if cfg.data.source != "fashion-mnist":
        raise HpoError(
            f"hpo bench --search compares a search with the notebook's fixed Fashion-MNIST CNN, but study "
            f"{cfg.name!r} trains on [data] source {cfg.data.source!r}. Give it a Fashion-MNIST study."
        )
    partial = setup.work_dir / "bench-search.json"
    partial.unlink(missing_ok=True)
    result: dict[str, Any] = {"time_s": setup.time_s}

    def keep(line: str) -> None:
        partial.write_text(json.dumps(result, indent=2))
        log.info("%s (kept in %s)", line, partial)

    study, cfg, out = _search_stage(setup, cfg, result)
    keep(
        f"search: {result['search']['test_accuracy']:.4f} test accuracy, {result['search']['trials']} trials, "
        f"{result['search']['wall_time_s']:.0f}s; now the fixed CNN for {setup.time_s:g}s"
    )
    _fixed_stage(setup, cfg, out, result)
    keep(
        f"fixed CNN: {result['fixed']['test_accuracy']:.4f} after {result['fixed']['epochs']} epochs; McNemar p = "
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

        result["fidelity"] = fidelity(study, cfg, setup, fidelity_top, row_done)
        del result["fidelity_so_far"]
        keep(f"fidelity: Spearman's rho {result['fidelity']['spearman']:.2f}")
    return result


def _search_stage(setup: Setup, cfg: Any, result: dict[str, Any]) -> tuple[Any, Any, Path]:
    """The search with its finalizer; its figures go to result["search"]. Returns the study, the
    settings it ran with (a study file with `fit_epochs` may have trained a shorter horizon than it
    names, and the fidelity retrains train the study's) and its final/ folder."""
    from hpo.search.study import stored_config

    started = time.perf_counter()
    study = optimize_in(setup, final=True)
    cfg = stored_config(study) or cfg
    out = final_dir(cfg.name, setup.work_dir / "runs")
    searched = json.loads((out / "metrics.json").read_text())
    states = [t.state.name for t in study.get_trials(deepcopy=False)]
    result["search"] = {
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
    }
    return study, cfg, out


def _fixed_stage(setup: Setup, cfg: Any, out: Path, result: dict[str, Any]) -> None:
    """The fixed CNN for the same time, then the paired test. These lines read the test split again,
    for the paired test only: the searched model as model.pt holds it, in fp32 (the finalizer's own
    figure; checked equal here)."""
    import torch

    from hpo.learn import data
    from hpo.learn.inference import load_model
    from hpo.learn.train import evaluate

    fixed = fixed_baseline(setup, cfg)
    test_images, test_labels = data.load_split(setup.data_dir, "test")
    model, _ = load_model(out / "model.pt", cfg.name)
    test = data.DeviceData(test_images, test_labels, torch.device("cpu"))
    search_predictions = evaluate(model, test, fast=False).predictions.tolist()
    truth = [int(y) for y in test_labels]
    again = sum(p == t for p, t in zip(search_predictions, truth)) / len(truth)
    searched = result["search"]["test_accuracy"]
    if abs(again - searched) > 1e-3:
        raise HpoError(f"model.pt scores {again:.4f} on the test split, but metrics.json says {searched:.4f}")
    result["fixed"] = {k: v for k, v in fixed.items() if k != "predictions"}
    result["difference"] = searched - fixed["test_accuracy"]
    result["paired"] = paired(search_predictions, fixed.pop("predictions"), truth)
