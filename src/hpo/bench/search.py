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
from pathlib import Path
from typing import Any

from hpo.bench.pipelines import DEFAULT_PARAMS
from hpo.errors import HpoError
from hpo.paths import final_dir

log = logging.getLogger(__name__)


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
    finalizer's is (hpo.search.budget.timed_replan), so the whole baseline, test pass included, ends within
    the budget it is compared at, as the search's finalizer must. The timing is warm: a cold epoch
    reads about twice the real time (docs/performance.md, "Search against a fixed guess").
    """
    import torch

    from hpo.learn import data
    from hpo.learn.devices import place
    from hpo.learn.model import Ensemble
    from hpo.learn.params import TrialParams
    from hpo.learn.train import TrainingRun, evaluate, fit, seconds_per_image, seeded_model
    from hpo.results.final import accuracy_figures
    from hpo.search import budget

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
    epochs = len(fit(model, train, None, run, replan=budget.timed_replan(deadline, 0.0, epochs)))  # as re-fitted
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
    import json

    import optuna

    from hpo.learn import data, sources
    from hpo.learn.devices import place
    from hpo.learn.params import TrialParams
    from hpo.learn.seeds import derive_seed
    from hpo.learn.train import evaluate, fit, recipe, seeded_model
    from hpo.results.stats import spearman
    from hpo.search.trials import value

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
        distinct.setdefault(json.dumps(trial.params, sort_keys=True), trial)
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
    from hpo.results.stats import mcnemar_exact

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

    from hpo.settings import config

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

    from hpo.learn import data
    from hpo.learn.inference import load_model
    from hpo.learn.train import evaluate
    from hpo.search.study import stored_config
    from hpo.settings import config

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
