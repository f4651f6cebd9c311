"""The trial objective: sample params, train on the validation split, report every epoch."""

from __future__ import annotations

import dataclasses
import gc
import io
import logging
import os
import statistics
import time
from collections.abc import Callable

import optuna
import torch

from hpo import attrs
from hpo.errors import HpoError
from hpo.learn import checkpoints
from hpo.learn.data import TrialData, trial_data
from hpo.learn.devices import Placement, place
from hpo.learn.model import count_parameters, cpu_weights
from hpo.learn.params import TrialParams
from hpo.learn.seeds import derive_seed
from hpo.learn.sources import DataSet
from hpo.learn.train import (
    EpochStats,
    Hooks,
    TrainingDiverged,
    evaluate,
    fit,
    probabilities,
    recipe,
    seconds_per_image,
    seeded_model,
    snapshot_device,
)
from hpo.search import artifacts, budget, space
from hpo.search.optuna_compat import trial_id
from hpo.search.session import Workspace
from hpo.search.trials import first_run
from hpo.settings.config import StudyConfig

log = logging.getLogger(__name__)

VAL_OUTPUTS_FILE = "val-outputs.pt"
TRIAL_MODEL_FILE = "trial-model.pt"


class OverBudget(Exception):
    """Every slot of the trial budget is taken by trials that are finished or running."""


class OutOfMemory(Exception):
    """The configuration does not fit in the device's memory; the trial fails, the worker goes on."""


def trial_seed(study_seed: int, trial: optuna.Trial) -> int:
    # A retried trial keeps its original number's seed, so the retry repeats the same run.
    frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
    return derive_seed(study_seed, first_run(frozen))


def validated(stats: EpochStats) -> tuple[float, float]:
    """A trial epoch's validation loss and accuracy (only the finalizer's epochs have none)."""
    if stats.val_loss is None or stats.val_accuracy is None:
        raise ValueError(f"epoch {stats.epoch} has no validation figures")
    return stats.val_loss, stats.val_accuracy


def history_row(stats: EpochStats) -> dict[str, float]:
    """One epoch as the trial's `history` attribute records it (the dashboard shows it)."""
    val_loss, val_accuracy = validated(stats)
    return {
        "epoch": stats.epoch,
        "train_loss": round(stats.train_loss, 5),
        "val_loss": round(val_loss, 5),
        "val_accuracy": round(val_accuracy, 5),
        "seconds": round(stats.seconds, 2),
    }


def load_resume_state(artifact_store, trial: optuna.Trial, params: TrialParams, seed: int) -> dict | None:
    """The training state a retried trial inherited from the trial that crashed, if it is usable,
    with every tensor on the CPU."""
    pointer = trial.user_attrs.get(attrs.CHECKPOINT)
    if artifact_store is None or not pointer:
        return None
    try:
        raw = artifacts.read_bytes(artifact_store, pointer["artifact_id"])
        # On the CPU whatever the device: the generator and RNG setters take CPU byte tensors only,
        # and fit's load_state_dict calls move the weights and optimizer state to the device.
        state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as e:  # a missing or truncated file: train from the start rather than fail
        log.warning(
            "trial %d: cannot read checkpoint %s (%s); starting at epoch 1", trial.number, pointer.get("artifact_id"), e
        )
        return None
    ours = (checkpoints.TRIAL_FORMAT, params.flat(), seed)
    if (state.get("format"), state.get("params"), state.get("seed")) != ours:
        log.warning(
            "trial %d: checkpoint %s is for another configuration; starting at epoch 1",
            trial.number,
            pointer["artifact_id"],
        )
        return None
    return state


def calibrate(cfg: StudyConfig, data: TrialData, placement: Placement) -> budget.EpochCost:
    """What a trial epoch costs before any has run: the study's first trial (its warm start, with
    the middle of the space for what the warm start leaves out), timed for a few training steps and
    one validation pass on up to 2,048 images, scaled to the trial's data."""
    params = space.first(cfg.space, cfg.warm_start.params)
    train_s = seconds_per_image(params, data.train, cfg.train, cfg.augment)
    held = data.val.head(2048)
    started = time.perf_counter()
    evaluate(seeded_model(params.model.shaped(held.shape), 0, placement.device), held, cfg.train.eval_batch_size)
    eval_s = (time.perf_counter() - started) / max(1, len(held))
    epoch_s = train_s * len(data.train) + eval_s * len(data.val)
    return budget.EpochCost(
        epoch_s, len(data.train), len(data.val), placement.threads, data.pool_images, data.test_images
    )


def calibrate_here(cfg: StudyConfig, dataset: DataSet, device: str | None, threads: int) -> budget.EpochCost:
    """`calibrate` on this machine's `device` (None: place()'s default) and `threads`, on the study's
    trial split of `dataset`; takes no GPU slot, since a worker may be about to want it."""
    placement = place(device, threads)
    split = trial_data(dataset, cfg.budget.val_fraction, cfg.seed, placement.device, cfg.budget.train_subset)
    return calibrate(cfg, split, placement)


def make_objective(
    cfg: StudyConfig,
    data: TrialData,
    workspace: Workspace,
    claim: Callable[[optuna.Trial], bool],
    plan: Callable[[], budget.Plan | None] = lambda: None,
    epoch_plan: Callable[[budget.NextEpoch], budget.Plan | None] = lambda _ask: None,
) -> Callable[[optuna.Trial], float]:
    """`claim(trial)` says whether the trial holds one of the budget's slots; it is asked first.
    `plan()` is the time-budget decision that let this trial start, recorded on it (None: no time budget).
    `epoch_plan(ask)` says, before each further epoch, whether the trial's epochs left still end
    before the finalizer's reserve (None: no time budget); a trial it stops is PRUNED.

    A COMPLETE trial leaves its validation outputs in the workspace's artifact store (`val_outputs`): the
    finalizer chooses ensemble members on them. One among the study's best also leaves its trained
    weights (`trial_model`), which the finalizer's ensemble reuses.

    With an artifact store, each trial keeps a checkpoint of its last epoch there while it runs,
    and a trial retried after its worker died resumes from its predecessor's checkpoint.
    """

    def objective(trial: optuna.Trial) -> float:
        if not claim(trial):
            trial.set_user_attr(attrs.REASON, "over budget: another worker took the last slot")
            raise OverBudget(f"trial {trial.number} is beyond the budget of {cfg.budget.n_trials}")
        return TrialRun(cfg, data, workspace, trial, epoch_plan).run(plan())

    return objective


class TrialRun:
    """One trial from its sampled params to its value: the state its epoch callbacks share (its
    history, its live checkpoint) and the report, prune and checkpoint steps that use it."""

    def __init__(
        self,
        cfg: StudyConfig,
        data: TrialData,
        workspace: Workspace,
        trial: optuna.Trial,
        epoch_plan: Callable[[budget.NextEpoch], budget.Plan | None] = lambda _ask: None,
    ):
        self.cfg, self.data, self.trial = cfg, data, trial
        self.placement, self.store = workspace.placement, workspace.artifact_store
        self.share = workspace.share if self.placement.device.type == "cpu" else None
        self.threads = torch.get_num_threads()  # the count the next epoch trains on
        self.epoch_plan = epoch_plan
        self.params = space.suggest(trial, cfg.space)
        self.seed = trial_seed(cfg.seed, trial)
        self.history: list[dict[str, float]] = []
        self.own_checkpoint: list[str] = []  # this trial's live checkpoint artifact, at most one
        self.started = time.perf_counter()

    def run(self, decision: budget.Plan | None) -> float:
        cfg, trial, placement = self.cfg, self.trial, self.placement
        self.rebalance(0)
        model = seeded_model(self.params.model.shaped(self.data.train.shape), self.seed, placement.device)
        for key, value in {
            **placement.describe(),
            attrs.PID: os.getpid(),
            attrs.SEED: self.seed,
            attrs.N_PARAMS: count_parameters(model),
            attrs.TRAIN_IMAGES: len(self.data.train),
            attrs.VAL_IMAGES: len(self.data.val),
            attrs.POOL_IMAGES: self.data.pool_images,
            attrs.TEST_IMAGES: self.data.test_images,
            attrs.PLAN: None if decision is None else dataclasses.asdict(decision),
        }.items():
            trial.set_user_attr(key, value)
        if trial.user_attrs.get(attrs.CHECKPOINT):
            artifacts.disown_inherited(trial)
        resume = load_resume_state(self.store, trial, self.params, self.seed)
        if resume is not None:
            self.replay(resume)
        checkpointing = self.store is not None and cfg.checkpoints.every_epoch
        try:
            run = recipe(cfg, self.params, self.seed)
            hooks = Hooks(self.on_epoch, self.on_snapshot if checkpointing else None)
            history_stats = fit(model, self.data.train, self.data.val, run, hooks, resume)
        except TrainingDiverged as e:
            trial.set_user_attr(attrs.REASON, str(e))
            self.drop_checkpoint()
            raise
        except torch.cuda.OutOfMemoryError as e:
            del model  # drop the weights and optimizer state before the next trial allocates its own
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            reason = (
                f"out of memory on {placement.name} with batch_size {self.params.optimizer.batch_size} and "
                f"filters {list(self.params.model.filters)}"
            )
            trial.set_user_attr(attrs.REASON, reason)
            self.drop_checkpoint()
            raise OutOfMemory(reason) from e
        if cfg.checkpoints.keep == "none":
            self.drop_checkpoint()
        self.keep_val_outputs(model)
        value = self.value_of(history_stats[-1])
        if cfg.final.trial_models and self.ranks_among_best(value):
            self.keep_model(model)
        trial.set_user_attr(attrs.WALL_TIME, round(time.perf_counter() - self.started, 2))
        return value

    def ranks_among_best(self, value: float) -> bool:
        """Whether a trial ending at `value` is among the `[final] ensemble` best COMPLETE trials so
        far: only those keep their weights, so a study of N trials keeps about
        ensemble x (1 + ln(N / ensemble)) models, not N."""
        done = self.trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        values = [t.value for t in done if t.value is not None]
        better = [v for v in values if (v > value if self.cfg.direction == "maximize" else v < value)]
        return len(better) < self.cfg.final.ensemble

    def keep_model(self, model: torch.nn.Module) -> None:
        """The trained weights, in the artifact store, for the finalizer to put beside the member it
        retrains (`[final] trial_models`): the same recipe and horizon, trained already."""
        if self.store is None:
            return
        payload = artifacts.torch_bytes(
            {
                "format": checkpoints.TRIAL_MODEL_FORMAT,
                "study": self.cfg.name,
                "params": self.params.flat(),
                "seed": self.seed,
                "state_dict": cpu_weights(model),
            }
        )
        try:
            pointer = artifacts.upload_bytes(self.store, self.trial, TRIAL_MODEL_FILE, payload)
        except HpoError as e:  # the finalizer then retrains the member alone, as without trial_models
            log.warning("trial %d: trained model not kept: %s", self.trial.number, e)
            return
        self.trial.set_user_attr(attrs.TRIAL_MODEL, pointer)

    def keep_val_outputs(self, model: torch.nn.Module) -> None:
        """The trained model's class probabilities on the validation split, in the artifact store,
        for the finalizer's choice of ensemble members (float16: 120 kB for 6,000 images)."""
        if self.store is None:
            return
        probs = probabilities(model, self.data.val, self.cfg.train.eval_batch_size)
        payload = artifacts.torch_bytes({"probs": probs.half(), "images": len(self.data.val), "seed": self.cfg.seed})
        try:
            pointer = artifacts.upload_bytes(self.store, self.trial, VAL_OUTPUTS_FILE, payload)
        except HpoError as e:  # without them the finalizer falls back on the trial's value alone
            log.warning("trial %d: validation outputs not kept: %s", self.trial.number, e)
            return
        self.trial.set_user_attr(attrs.VAL_OUTPUTS, pointer)

    def value_of(self, stats: EpochStats) -> float:
        val_loss, val_accuracy = validated(stats)
        return val_accuracy if self.cfg.metric == "val_accuracy" else val_loss

    def replay(self, resume: dict) -> None:
        """The retry copied the crashed trial's reports; add any epoch it checkpointed but had not reported."""
        trial = self.trial
        reported = trial.storage.get_trial(trial_id(trial)).intermediate_values
        for row in resume["history"]:
            stats = EpochStats(**row)
            self.history.append(history_row(stats))
            if stats.epoch not in reported:
                trial.report(self.value_of(stats), stats.epoch)
        trial.set_user_attr(attrs.RESUMED_FROM, resume["epoch"])
        # Exact only on the device type the snapshot came from (train.restore_random_state).
        trial.set_user_attr(attrs.RESUMED_EXACTLY, snapshot_device(resume) == self.placement.device.type)
        log.info(
            "trial %d resumes after epoch %d from checkpoint %s",
            trial.number,
            resume["epoch"],
            trial.user_attrs[attrs.CHECKPOINT]["artifact_id"],
        )

    def on_snapshot(self, state: dict) -> None:
        trial = self.trial
        # A worker that was paused past the grace period must not upload into a trial reaped meanwhile.
        if trial.storage.get_trial(trial_id(trial)).state.is_finished():
            raise optuna.exceptions.UpdateFinishedTrialError(f"trial {trial.number} was finished elsewhere")
        payload = artifacts.torch_bytes(
            {
                **state,
                "format": checkpoints.TRIAL_FORMAT,
                "params": self.params.flat(),
                "seed": self.seed,
                "study": self.cfg.name,
            }
        )
        assert self.store is not None  # checkpoints are taken only with a store (TrialRun.run)
        try:
            new = artifacts.upload_bytes(self.store, trial, f"checkpoint-epoch{state['epoch']}.pt", payload)
        except HpoError as e:  # no checkpoint costs a resume, not the trial
            log.warning("trial %d: %s", trial.number, e)
            return
        trial.set_user_attr(attrs.CHECKPOINT, {"artifact_id": new, "epoch": state["epoch"]})
        self.drop_checkpoint()
        self.own_checkpoint.append(new)

    def drop_checkpoint(self) -> None:
        while self.own_checkpoint and self.store is not None:
            artifacts.remove(self.store, self.trial, self.own_checkpoint.pop())

    def on_epoch(self, stats: EpochStats) -> None:
        cfg, trial = self.cfg, self.trial
        value = self.value_of(stats)
        self.history.append({**history_row(stats), "threads": self.threads})
        trial.set_user_attr(attrs.HISTORY, self.history)
        trial.set_user_attr(attrs.EPOCH, stats.epoch)
        log.info(
            "trial %d epoch %d/%d  loss %.4f  val_acc %.4f  (%.1fs)",
            trial.number,
            stats.epoch,
            cfg.budget.epochs,
            stats.train_loss,
            stats.val_accuracy,
            stats.seconds,
        )
        trial.report(value, stats.epoch)
        # Pruning after the last epoch saves nothing and hides a full-fidelity value from the sampler.
        if stats.epoch >= cfg.budget.epochs:
            return
        if trial.should_prune():
            self.stop(f"val {cfg.metric} {value:.4f} at epoch {stats.epoch}")
        # Its epochs at the threads it trains on now: epochs before a rebalance ran on fewer.
        seconds = budget.current_epochs(self.history)[0]
        ask = budget.NextEpoch(trial.number, max(seconds), cfg.budget.epochs - stats.epoch, statistics.median(seconds))
        plan = self.epoch_plan(ask)
        if plan is not None and not plan.fits:
            reason = f"time budget: {plan.describe()}, so it stops after epoch {stats.epoch}"
            trial.set_user_attr(attrs.REASON, reason)
            self.stop(reason)
        self.rebalance(stats.epoch)

    def rebalance(self, epoch: int) -> None:
        """Take the cores that workers of the same `hpo optimize` left behind (CpuShare), from the next epoch."""
        if self.share is None:
            return
        threads = self.share.threads()
        if threads != self.threads:
            log.info(
                "trial %d: %d of %d local workers still run, so it trains on %d threads from epoch %d",
                self.trial.number,
                self.share.running(),
                self.share.launched,
                threads,
                epoch + 1,
            )
            torch.set_num_threads(threads)
            self.threads = threads

    def stop(self, why: str) -> None:
        self.trial.set_user_attr(attrs.WALL_TIME, round(time.perf_counter() - self.started, 2))
        self.drop_checkpoint()
        raise optuna.TrialPruned(why)
