"""The trial objective: sample params, train on the validation split, report every epoch."""

from __future__ import annotations

import gc
import logging
import os
import time
from typing import Callable

import numpy as np
import optuna
import torch

from hpo import space
from hpo.config import StudyConfig
from hpo.data import TrialData
from hpo.devices import Placement
from hpo.model import count_parameters
from hpo.train import EpochStats, Hyper, TrainingDiverged, fit, seeded_model

log = logging.getLogger(__name__)

REASON_ATTR = "fail_reason"


class OverBudget(Exception):
    """Every slot of the trial budget is taken by trials that are finished or running."""


class OutOfMemory(Exception):
    """The configuration does not fit in the device's memory; the trial fails, the worker goes on."""


def derive_seed(*parts: int) -> int:
    """A 31-bit seed that depends on every part, so nearby trials get unrelated streams."""
    return int(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(1)[0] >> 1)


def trial_seed(study_seed: int, trial: optuna.Trial) -> int:
    # A retried trial keeps its original number's seed, so the retry repeats the same run.
    frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
    origin = optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(frozen)
    return derive_seed(study_seed, trial.number if origin is None else origin)


def make_objective(cfg: StudyConfig, data: TrialData, placement: Placement,
                   claim: Callable[[optuna.Trial], bool]) -> Callable[[optuna.Trial], float]:
    """`claim(trial)` says whether the trial holds one of the budget's slots; it is asked first."""

    def objective(trial: optuna.Trial) -> float:
        if not claim(trial):
            trial.set_user_attr(REASON_ATTR, "over budget: another worker took the last slot")
            raise OverBudget(f"trial {trial.number} is beyond the budget of {cfg.budget.n_trials}")
        params = space.suggest(trial, cfg.space)
        seed = trial_seed(cfg.seed, trial)
        model = seeded_model(params, seed, placement.device)
        for key, value in {**placement.describe(), "pid": os.getpid(), "seed": seed,
                           "n_params": count_parameters(model)}.items():
            trial.set_user_attr(key, value)
        history: list[dict[str, float]] = []
        started = time.perf_counter()

        def on_epoch(stats: EpochStats) -> None:
            value = stats.val_accuracy if cfg.metric == "val_accuracy" else stats.val_loss
            history.append({"epoch": stats.epoch, "train_loss": round(stats.train_loss, 5),
                            "val_loss": round(stats.val_loss, 5), "val_accuracy": round(stats.val_accuracy, 5),
                            "seconds": round(stats.seconds, 2)})
            trial.set_user_attr("history", history)
            trial.set_user_attr("epoch", stats.epoch)
            log.info("trial %d epoch %d/%d  loss %.4f  val_acc %.4f  (%.1fs)", trial.number, stats.epoch,
                     cfg.budget.epochs, stats.train_loss, stats.val_accuracy, stats.seconds)
            trial.report(value, stats.epoch)
            # Pruning after the last epoch saves nothing and hides a full-fidelity value from the sampler.
            if stats.epoch < cfg.budget.epochs and trial.should_prune():
                trial.set_user_attr("wall_time_s", round(time.perf_counter() - started, 2))
                raise optuna.TrialPruned(f"val {cfg.metric} {value:.4f} at epoch {stats.epoch}")

        try:
            history_stats = fit(model, data.train, data.val, Hyper.from_params(params), cfg.train,
                                cfg.augment, cfg.budget.epochs, seed, on_epoch)
        except TrainingDiverged as e:
            trial.set_user_attr(REASON_ATTR, str(e))
            raise
        except torch.cuda.OutOfMemoryError as e:
            del model  # drop the weights and optimizer state before the next trial allocates its own
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            reason = (f"out of memory on {placement.name} with batch_size {params['batch_size']} and "
                      f"filters {[params[f'filters_{i}'] for i in range(params['n_conv'])]}")
            trial.set_user_attr(REASON_ATTR, reason)
            raise OutOfMemory(reason) from e
        except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM from `docker compose stop`
            trial.set_user_attr(REASON_ATTR, f"worker stopped ({e or 'SIGINT'}); re-queued")
            raise
        trial.set_user_attr("wall_time_s", round(time.perf_counter() - started, 2))
        last = history_stats[-1]
        return last.val_accuracy if cfg.metric == "val_accuracy" else last.val_loss

    return objective
