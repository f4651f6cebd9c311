"""The finalizer: choose the members, fit their epochs to the time left, retrain them from scratch on
train + validation, score the test split once, and publish the model, its figures and the study's note."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna_dashboard import save_note

import hpo
from hpo import artifacts, budget, checkpoints, plots
from hpo import data as data_mod
from hpo import trials as trials_mod
from hpo.config import StudyConfig
from hpo.data import CLASSES, DeviceData
from hpo.devices import Placement
from hpo.errors import HpoError
from hpo.model import Ensemble, count_parameters
from hpo.params import TrialParams
from hpo.progress import Progress
from hpo.storage import SlotLock, final_dir
from hpo.study import FINAL_ATTR, finished_count
from hpo.train import EpochStats, Replan, TrainingRun, derive_seed, evaluate, fit, seconds_per_image, seeded_model

log = logging.getLogger(__name__)

FINAL_SEED_TAG = 0x46494E41  # "FINA": keeps the final run's seed apart from every trial's


def versions() -> dict[str, str]:
    found = {"python": platform.python_version(), "hpo": hpo.__version__}
    for dist in ("torch", "torchvision", "optuna", "optuna-dashboard", "sqlalchemy", "numpy"):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return found


def git_revision() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("HPO_GIT_REVISION")


def _check_writable(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise HpoError(f"cannot create the output directory {out_dir} ({e.strerror}). Pass a writable --out.") from e
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise HpoError(f"output directory {out_dir} is not writable. Pass a writable --out.")


def wilson_interval(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95 % for the default z): honest near 0 and 1,
    unlike the normal approximation, and what a 10,000-image test accuracy should be quoted with."""
    if n <= 0:
        return 0.0, 1.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy_figures(predictions: torch.Tensor, truth: torch.Tensor) -> dict[str, Any]:
    correct = int((predictions == truth).sum())
    low, high = wilson_interval(correct, len(truth))
    return {
        "accuracy": correct / max(1, len(truth)),
        "correct": correct,
        "images": len(truth),
        "ci95": [round(low, 5), round(high, 5)],
    }


def choose_members(
    study: optuna.Study, cfg: StudyConfig, k: int, timed: bool = False
) -> tuple[list[optuna.trial.FrozenTrial], str | None]:
    """The `k` members' trials, best first, chosen by validation value (and, when `timed`, speed), and
    why the ensemble is not the `k` best distinct trials, if it is not.

    A member beyond the best must score within `[final] member_gap` of it: a clearly weaker model
    pulls the averaged softmax down (a 60-minute cnn run averaged members at 93.8, 92.1 and 90.1 %
    into 93.1 %, below its best member), so the ensemble shrinks rather than take one; with
    `[final] fill = "seeds"` the best trial takes the empty places again, each with its own seed.
    Within a time budget (`timed`), `[final] speed_tie` puts the fastest of the trials tied with the
    best first: it trains the most epochs in the time that is left.
    """
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        raise HpoError(
            f"study {cfg.name!r} has no COMPLETE trial yet, so there is nothing to retrain. "
            f"Run `hpo optimize --study {cfg.name}` (or workers) until one completes."
        )
    maximize = cfg.direction == "maximize"
    ranked = sorted(complete, key=trials_mod.value, reverse=maximize)
    distinct: dict[str, optuna.trial.FrozenTrial] = {}
    for trial in ranked:
        distinct.setdefault(json.dumps(trial.params, sort_keys=True), trial)
    seeds = cfg.final.fill == "seeds"
    if k > len(distinct) and not seeds:
        raise HpoError(
            f"[final] ensemble = {k}, but study {cfg.name!r} has only {len(distinct)} distinct "
            f'COMPLETE trial(s). Lower ensemble to at most {len(distinct)}, add fill = "seeds" to '
            f"[final], or run more trials."
        )
    order, lead = list(distinct.values()), None
    if timed and cfg.final.speed_tie > 0:
        order, lead = _fastest_first(order, cfg)
    best = trials_mod.value(ranked[0])
    close = [trial for trial in order[:k] if abs(trials_mod.value(trial) - best) <= cfg.final.member_gap + 1e-12]
    if len(close) == k:
        return close, lead
    why = (
        f"only {len(close)} of the {k} best distinct trials score within member_gap {cfg.final.member_gap:g} "
        f"of the best {cfg.metric} {best:.4f}"
    )
    if seeds:
        members = close + [order[0]] * (k - len(close))
        change = (
            f"{k - len(close)} of the {k} member places went to the first member, trial {order[0].number}, "
            f'with further seeds ([final] fill = "seeds"): {why}'
        )
    else:
        members, change = close, f"ensemble shrank from {k} to {len(close)} member(s): {why}"
    return members, "; ".join(filter(None, [lead, change]))


def _fastest_first(
    order: list[optuna.trial.FrozenTrial], cfg: StudyConfig
) -> tuple[list[optuna.trial.FrozenTrial], str | None]:
    """`order` (best first) with the fastest trial within `[final] speed_tie` of the best moved to the
    front, and a note saying so. On 6,000 validation images two trials 0.005 apart are within one
    standard error of each other; the cheaper one trains more epochs in the time left (a quick start
    handed over a 48/48/48 CNN at 16 s per final epoch, 0.002 above a 32/64 CNN at 11 s)."""
    best = trials_mod.value(order[0])
    tied = [trial for trial in order if abs(trials_mod.value(trial) - best) <= cfg.final.speed_tie + 1e-12]
    costs = {trial.number: cost.per_image_s() for trial in tied if (cost := budget.trial_cost(trial)) is not None}
    if order[0].number not in costs or len(costs) < 2:
        return order, None
    fastest = min((trial for trial in tied if trial.number in costs), key=lambda trial: costs[trial.number])
    if fastest is order[0]:
        return order, None
    note = (
        f"trial {fastest.number} leads the final run: its {cfg.metric} {trials_mod.value(fastest):.4f} is within "
        f"speed_tie {cfg.final.speed_tie:g} of the best, trial {order[0].number}'s {best:.4f}, and it trains "
        f"{costs[order[0].number] / costs[fastest.number]:.2f}x as fast, so it gets more epochs in the time left"
    )
    return [fastest] + [trial for trial in order if trial is not fastest], note


@dataclass
class Member:
    trial: optuna.trial.FrozenTrial
    seed: int
    model: torch.nn.Module
    history: list[EpochStats]
    train_s: float


def member_seed(cfg: StudyConfig, index: int) -> int:
    # Member 0 keeps the seed a single-model final run always had, so its results reproduce.
    return derive_seed(cfg.seed, FINAL_SEED_TAG) if index == 0 else derive_seed(cfg.seed, FINAL_SEED_TAG, index)


# Growing past [final] epochs is optional, so it keeps a wider margin than shrinking to fit: in a
# quick start the timed steps read 12.5 s per epoch for epochs that then took 14.2 s, and 29 grown
# epochs ended 32 s past the deadline.
SHRINK_MARGIN, GROW_MARGIN = 1.05, 1.2


def test_pass_seconds(chosen: list[optuna.trial.FrozenTrial], cfg: StudyConfig, train_all: DeviceData) -> float:
    """Seconds `score` will take on the test split: every member's fp32 forward passes (one per TTA
    view) twice, once in the ensemble and once alone, timed on 1,024 training images with the first
    member's model (the test split is not read before it is scored)."""
    params = TrialParams.from_flat(chosen[0].params)
    model = seeded_model(params.model, 0, train_all.device)
    sample = DeviceData(train_all.x[:1024], train_all.y[:1024], train_all.device)
    evaluate(model, DeviceData(sample.x[:64], sample.y[:64], sample.device), cfg.train.eval_batch_size, fast=False)
    started = time.perf_counter()
    evaluate(model, sample, cfg.train.eval_batch_size, fast=False)
    per_image = (time.perf_counter() - started) / max(1, len(sample))
    return per_image * budget.TEST_IMAGES * test_passes(cfg, len(chosen))


def test_passes(cfg: StudyConfig, members: int) -> int:
    """Forward passes `score` makes per test image: each member with each TTA view, in the ensemble
    and again alone (one member: the ensemble is the member, scored twice all the same)."""
    return budget.test_passes(cfg.final.tta) * members


def fitted_epochs(
    trial: optuna.trial.FrozenTrial,
    cfg: StudyConfig,
    train_all: DeviceData,
    epochs: int,
    deadline: budget.Deadline,
    test_s: float,
    most: int | None = None,
) -> int:
    """The epochs of the first member that end before `deadline`, `test_s` for the test passes kept
    free: all of them unless time is short, else as many as fit (at least one), from this machine's
    measured speed for that configuration. With `most` above `epochs`, time left over grows them up to `most`."""
    # 60 steps after 10: 12 after 2 read 17.8 s per epoch for a model that then trained at 14.6 s.
    params = TrialParams.from_flat(trial.params)
    per_epoch = seconds_per_image(params, train_all, cfg.train, cfg.augment, steps=60, warmup=10) * len(train_all)
    fitted = _epochs_that_fit(per_epoch, _time_left(deadline, test_s), epochs, most)
    log.info(
        f"final-train: {per_epoch:.1f}s per epoch measured, {deadline.left():.0f}s left ({test_s:.0f}s of "
        f"them for the test passes): {fitted} of {most or epochs} epochs fit"
    )
    return fitted


def _time_left(deadline: budget.Deadline, test_s: float) -> float:
    """Seconds left for training epochs: the deadline less the slack and the measured test passes."""
    return deadline.left() - budget.slack_s(deadline.time_s) - test_s


def _epochs_that_fit(per_epoch: float, left: float, epochs: int, most: int | None, done: int = 0) -> int:
    """Epochs in all (`done` of them trained already) that end in `left` seconds more: up to `epochs`
    with the shrinking margin, then up to `most` with the growing one."""
    fitted = min(epochs, done + int(left // (SHRINK_MARGIN * per_epoch)))
    if fitted >= epochs and most is not None and most > epochs:
        fitted = max(epochs, min(most, done + int(left // (GROW_MARGIN * per_epoch))))
    return max(done or 1, fitted)


def timed_replan(deadline: budget.Deadline, test_s: float, epochs: int, most: int | None) -> Replan:
    """Re-fit the first member's epochs to the epochs it has timed itself, through its first half.

    The 60-step timing before training is read under whatever else loads the machine at that moment:
    in one quick start it read 20.8 s per epoch for a CNN that then trained at 12 s, and the
    finalizer fitted 23 epochs where 36 fitted. The median of the real epochs is robust to one slow
    one; past halfway the schedule is left alone, since stretching it late would raise the learning
    rate again."""

    def replan(history: list[EpochStats], total: int) -> int:
        done = len(history)
        if done >= total or 2 * done > total:
            return total
        per_epoch = statistics.median(s.seconds for s in history)
        new = _epochs_that_fit(per_epoch, _time_left(deadline, test_s), epochs, most, done)
        if new != total:
            log.info(f"final-train: {per_epoch:.1f}s per epoch trained after epoch {done}: {new} epochs fit")
        return new

    return replan


def train_members(
    chosen: list[optuna.trial.FrozenTrial],
    cfg: StudyConfig,
    train_all: DeviceData,
    epochs: int,
    deadline: budget.Deadline | None,
) -> tuple[list[Member], int, str | None]:
    """Retrain each chosen trial from scratch, one after another. With a deadline, the first member
    trains the epochs that fit (all of them unless time is short; re-fitted to its own epoch times as
    it trains) and the ensemble stops before a member that would end past it. Returns the members,
    their epochs and what shrank, if anything."""
    members: list[Member] = []
    shrunk: list[str] = []
    replan = None
    requested = epochs
    test_s = 0.0
    if deadline is not None:
        # Time the search left over goes to a lone model's epochs, up to [final] max_epochs; an
        # ensemble spends it on its members instead.
        grow = len(chosen) == 1 and cfg.final.max_epochs is not None and epochs == cfg.final.epochs
        most = cfg.final.max_epochs if grow else None
        test_s = test_pass_seconds(chosen, cfg, train_all)
        epochs = fitted_epochs(chosen[0], cfg, train_all, epochs, deadline, test_s, most=most)
        replan = timed_replan(deadline, test_s, requested, most)
    for index, trial in enumerate(chosen):
        if (
            members
            and deadline is not None
            and (late := _would_end_late(members, trial, index, deadline, test_s, len(chosen)))
        ):
            shrunk.append(
                f"ensemble shrank from {len(chosen)} to {len(members)} member(s) to end within the time budget: {late}"
            )
            break
        which = f"member {index + 1}/{len(chosen)}"
        members.append(_train_member(trial, cfg, train_all, epochs, member_seed(cfg, index), which, replan))
        epochs, replan = len(members[0].history), None  # the other members train as long as the first did
    if epochs < requested:
        shrunk.insert(0, f"epochs shrank from {requested} to {epochs} to end within the time budget")
    elif epochs > requested:
        log.info("final-train: epochs grew from %d to %d to use the time the search left", requested, epochs)
    for line in shrunk:
        log.warning("final-train: %s", line)
    return members, epochs, "; ".join(shrunk) or None


def _would_end_late(
    members: list[Member],
    trial: optuna.trial.FrozenTrial,
    index: int,
    deadline: budget.Deadline,
    test_s: float,
    chosen: int,
) -> str | None:
    """Why member `index` would end past the deadline: the first member's measured time, scaled by
    the trials' relative cost per image, plus the test passes of an ensemble of `index + 1` (`test_s`
    is for all `chosen`); None if it fits."""
    first, this = budget.trial_cost(members[0].trial), budget.trial_cost(trial)
    ratio = this.per_image_s() / first.per_image_s() if first and this else 1.0
    needed = members[0].train_s * ratio + budget.slack_s(deadline.time_s) + test_s * (index + 1) / chosen
    if deadline.left() >= needed:
        return None
    return (
        f"member {index + 1} (trial {trial.number}) needs about {needed:.0f}s, "
        f"{max(0.0, deadline.left()):.0f}s are left"
    )


def _train_member(
    trial: optuna.trial.FrozenTrial,
    cfg: StudyConfig,
    train_all: DeviceData,
    epochs: int,
    seed: int,
    which: str,
    replan: Replan | None = None,
) -> Member:
    log.info(
        f"final-train: {which} is trial {trial.number} (val {cfg.metric} {trial.value:.4f}), "
        f"{len(train_all)} images, {epochs} epochs, seed {seed}"
    )
    desc = "final-train" if which == "member 1/1" else f"final-train {which}"
    started = time.perf_counter()
    params = TrialParams.from_flat(trial.params)
    model = seeded_model(params.model, seed, train_all.device)
    with Progress(epochs, desc, "epochs") as bar:

        def on_epoch(stats: EpochStats) -> None:
            loss, acc = f"{stats.train_loss:.4f}", f"{stats.train_accuracy:.4f}"
            bar.advance(
                line=f"epoch {stats.epoch}/{bar.total}  loss {loss}  train_acc {acc}  ({stats.seconds:.1f}s)",
                loss=loss,
                acc=acc,
            )

        def replan_shown(history: list[EpochStats], total: int) -> int:
            new = replan(history, total) if replan is not None else total
            bar.resize(new)
            return new

        run = TrainingRun(params.optimizer, cfg.train, cfg.augment, epochs, seed)
        history = fit(model, train_all, None, run, on_epoch, replan=replan_shown if replan is not None else None)
    return Member(trial, seed, model, history, time.perf_counter() - started)


def final_train(
    study: optuna.Study,
    cfg: StudyConfig,
    data_dir: Path,
    placement: Placement,
    out_dir: Path,
    epochs: int | None = None,
    artifact_store=None,
    storage: optuna.storages.RDBStorage | None = None,
    deadline: budget.Deadline | None = None,
) -> dict[str, Any]:
    """Retrain the [final] ensemble, score the test split once, write model.pt, metrics.json and three
    PNGs to `out_dir`, upload them to the study in `artifact_store`, and write the dashboard note.

    With `deadline`, members train while they fit before it and the ensemble shrinks to what did."""
    _check_writable(out_dir)
    if (out_dir / "model.pt").exists():
        checkpoints.load_final(out_dir / "model.pt", cfg.name)  # never overwrite another study's model
    chosen, gated = choose_members(study, cfg, cfg.final.ensemble, timed=deadline is not None)
    if gated:
        log.info("final-train: %s", gated)
    epochs = epochs or cfg.final.epochs
    started = time.perf_counter()
    images, labels = data_mod.load_split(data_dir, "train")
    train_all = DeviceData(images, labels, placement.device)
    members, epochs, shrunk = train_members(chosen, cfg, train_all, epochs, deadline)
    shrunk = "; ".join(s for s in (gated, shrunk) if s) or None
    train_seconds = time.perf_counter() - started

    # The only read of the test split in the whole project.
    test_images, test_labels = data_mod.load_split(data_dir, "test")
    test = DeviceData(test_images, test_labels, placement.device)
    metrics, ev = score(cfg, members, test)
    # "best" is the search's best by validation; the first member can be another trial ([final] speed_tie).
    search_best = trials_mod.best_first(study, cfg.direction == "maximize")[0]
    metrics.update(
        best_trial=search_best.number,
        best_trial_value=search_best.value,
        lead_trial=members[0].trial.number,
        lead_trial_value=members[0].trial.value,
        epochs=epochs,
        train_images=len(train_all),
        ensemble={**metrics["ensemble"], "shrunk": shrunk},
        wall_time_s=round(time.perf_counter() - started, 2),
        train_time_s=round(train_seconds, 2),
        device=placement.describe(),
        versions=versions(),
        git_revision=git_revision(),
    )
    files = _result_files(
        cfg, metrics, _checkpoint(cfg, members, ev.accuracy), ev, test.y.cpu(), test_images, members[0]
    )
    for name, payload in files.items():
        checkpoints.write_atomic(out_dir / name, payload)
    _record(study, cfg, members[0].trial, metrics, files, out_dir, artifact_store, storage)
    return metrics


SUMMARY_KEYS = (
    "test_accuracy",
    "test_ci95",
    "test_loss",
    "best_trial",
    "best_trial_value",
    "seed",
    "epochs",
    "wall_time_s",
)


def _record(
    study: optuna.Study,
    cfg: StudyConfig,
    best: optuna.trial.FrozenTrial,
    metrics: dict[str, Any],
    files: dict[str, bytes],
    out_dir: Path,
    artifact_store: Any,
    storage: optuna.storages.RDBStorage | None,
) -> None:
    """Upload the files, and write the study's final summary, its headline attribute and its note."""
    summary = {k: metrics[k] for k in SUMMARY_KEYS}
    summary["members"] = [r["trial"] for r in metrics["members"]]
    summary["output_dir"] = str(out_dir.resolve())
    # Two final-trains at once each replace the other's artifacts in turn, never both at the same time.
    with SlotLock(storage, f"{cfg.name}.final") if storage is not None else contextlib.nullcontext():
        if artifact_store is not None:
            summary["artifacts"] = publish(study, artifact_store, files)
        study.set_user_attr(FINAL_ATTR, summary)
        # Sorts first in the dashboard's user-attribute table, so a final-trained study shows it at a glance.
        study.set_user_attr("final_test_accuracy", metrics["test_accuracy"])
        save_note(study, note(cfg, best, metrics))


def score(cfg: StudyConfig, members: list[Member], test: DeviceData) -> tuple[dict[str, Any], Any]:
    """The ensemble's test figures (the headline), each member's own, and the per-class accuracy.

    fp32, the precision of `hpo export`'s files: the figure reported is the figure an export gets."""
    ev = evaluate(
        Ensemble([member.model for member in members], cfg.final.tta), test, cfg.train.eval_batch_size, fast=False
    )
    truth = test.y.cpu()
    member_rows = []
    for member in members:
        alone = accuracy_figures(
            evaluate(Ensemble([member.model], cfg.final.tta), test, cfg.train.eval_batch_size, fast=False).predictions,
            truth,
        )
        member_rows.append(
            {
                "trial": member.trial.number,
                "value": member.trial.value,
                "seed": member.seed,
                "params": member.trial.params,
                "test_accuracy": alone["accuracy"],
                "ci95": alone["ci95"],
                "train_time_s": round(member.train_s, 2),
                "n_params": count_parameters(member.model),
            }
        )
    best = members[0]
    metrics: dict[str, Any] = {
        "study": cfg.name,
        "test_accuracy": ev.accuracy,
        "test_ci95": accuracy_figures(ev.predictions, truth)["ci95"],
        "test_loss": ev.loss,
        "test_images": len(test),
        "per_class_accuracy": {
            name: float((ev.predictions[truth == i] == i).float().mean()) for i, name in enumerate(CLASSES)
        },
        "ensemble": {
            "requested": cfg.final.ensemble,
            "trained": len(members),
            "tta": cfg.final.tta,
            "gain_over_best_member": ev.accuracy - max(r["test_accuracy"] for r in member_rows),
        },
        "members": member_rows,
        "best_trial": best.trial.number,
        "best_trial_value": best.trial.value,
        "metric": cfg.metric,
        "params": best.trial.params,
        "seed": best.seed,
        "n_params": sum(r["n_params"] for r in member_rows),
        "history": [
            {"epoch": s.epoch, "train_loss": s.train_loss, "train_accuracy": s.train_accuracy} for s in best.history
        ],
    }
    return metrics, ev


def _checkpoint(cfg: StudyConfig, members: list[Member], test_accuracy: float) -> dict[str, Any]:
    """model.pt: every member's weights and spec (checkpoints.FINAL_FORMAT)."""
    best = members[0]
    return {
        "format": checkpoints.FINAL_FORMAT,
        "study": cfg.name,
        "trial": best.trial.number,
        "params": best.trial.params,
        "tta": cfg.final.tta,
        "members": [
            {
                "trial": m.trial.number,
                "params": m.trial.params,
                "seed": m.seed,
                "model_spec": TrialParams.from_flat(m.trial.params).model.to_dict(),
                "state_dict": {k: v.detach().cpu() for k, v in m.model.state_dict().items()},
            }
            for m in members
        ],
        "test_accuracy": test_accuracy,
        "hpo_version": hpo.__version__,
    }


def after_search(
    study: optuna.Study,
    cfg: StudyConfig,
    storage: optuna.storages.RDBStorage,
    directory: Path,
    device: str | None,
    artifact_store: Any,
    finished_before: int | None = None,
) -> dict[str, Any]:
    """`optimize --final`: the finalizer in this process, within what is left of the time budget.
    `finished_before`: the study's finished trials when the command started; if the search added
    none and the study has a published model, it is kept."""
    from hpo.devices import place

    if not study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        raise HpoError(
            f"--final: study {cfg.name!r} has no COMPLETE trial after the search, so there is nothing "
            "to retrain. Give a longer --time (or more [budget] n_trials) and run again."
        )
    deadline = budget.get_deadline(study)
    published = study.user_attrs.get(FINAL_ATTR)
    if published and finished_before is not None and finished_count(study) == finished_before:
        # Nothing new to retrain from, and inside a spent budget the retrain could only be shorter.
        left = "" if deadline is None else f" with {max(0.0, deadline.left()):.0f}s of its time budget left"
        raise HpoError(
            f"--final: the search finished no new trial{left}, so the published model (test accuracy "
            f"{100 * published['test_accuracy']:.2f} %) is kept. Give more time (`hpo extend --study "
            f"{cfg.name} --time 10m`, or --time 10m), or retrain by hand with `hpo final-train`."
        )
    # A GPU for the finalizer without taking a worker's claim on it (the workers have exited).
    placement = place(device or ("cuda:0" if torch.cuda.is_available() else "cpu"))
    return final_train(
        study, cfg, directory, placement, final_dir(cfg.name), None, artifact_store, storage, deadline=deadline
    )


def _result_files(
    cfg: StudyConfig,
    metrics: dict[str, Any],
    checkpoint: dict[str, Any],
    ev: Any,
    truth: torch.Tensor,
    test_images: Any,
    best: Member,
) -> dict[str, bytes]:
    truth_np, pred_np = truth.numpy(), ev.predictions.numpy()
    counts = plots.confusion_matrix(truth_np, pred_np, CLASSES)
    metrics["confusion_matrix"] = counts.tolist()
    what = "final model" if len(metrics["members"]) == 1 else f"ensemble of {len(metrics['members'])}"
    return {
        "model.pt": artifacts.torch_bytes(checkpoint),
        "metrics.json": json.dumps(metrics, indent=2).encode(),
        "confusion_matrix.png": plots.confusion_matrix_png(
            counts, CLASSES, f"{cfg.name}: {what} on the test split, accuracy {ev.accuracy:.4f}"
        ),
        "learning_curve.png": plots.learning_curve_png(
            best.trial.user_attrs.get("history", []), metrics["history"], ev.accuracy, best.trial.number
        ),
        "misclassified.png": plots.misclassified_png(test_images, truth_np, pred_np, ev.confidence.numpy(), CLASSES),
    }


def publish(study: optuna.Study, store, files: dict[str, bytes]) -> dict[str, str]:
    """Upload the final files to the study, replacing an earlier final-train's."""
    earlier = (study.user_attrs.get(FINAL_ATTR) or {}).get("artifacts", {})
    ids = {name: artifacts.upload_bytes(store, study, name, payload) for name, payload in files.items()}
    for artifact_id in earlier.values():
        artifacts.remove(store, study, artifact_id)
    return ids


def describe_accuracy(accuracy: float, ci95: list[float]) -> str:
    """ "93.61 % (95 % CI 93.12-94.07)": the headline figure with its Wilson interval, in percent."""
    return f"{100 * accuracy:.2f} % (95 % CI {100 * ci95[0]:.2f}-{100 * ci95[1]:.2f})"


def note(cfg: StudyConfig, best: optuna.trial.FrozenTrial, metrics: dict[str, Any]) -> str:
    """The study's dashboard note: the final result first, so a final-trained study is obvious."""
    val, test = metrics.get("lead_trial_value", metrics["best_trial_value"]), metrics["test_accuracy"]
    ens = metrics["ensemble"]
    params = "\n".join(
        f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in best.params.items()
    )
    worst = min(metrics["per_class_accuracy"].items(), key=lambda kv: kv[1])
    what = "the final model" if ens["trained"] == 1 else f"the ensemble of {ens['trained']}"
    rows = [
        f"| validation {cfg.metric} of trial {best.number} | {val:.4f} |",
        f"| test accuracy of {what} | {describe_accuracy(test, metrics['test_ci95'])} |",
    ]
    rows += [
        f"| member: trial {r['trial']} (val {r['value']:.4f}, seed {r['seed']}) | "
        f"{describe_accuracy(r['test_accuracy'], r['ci95'])} |"
        for r in metrics["members"]
    ]
    if ens["trained"] > 1:
        rows.append(f"| gain of the ensemble over its best member | {100 * ens['gain_over_best_member']:+.2f} points |")
    if cfg.metric == "val_accuracy":
        rows.append(f"| gap, test minus validation | {100 * (test - val):+.2f} points |")
    rows.append(f"| weakest class | {worst[0]} ({worst[1]:.4f}) |")
    table = "\n".join(rows)
    policy = (
        f"The {ens['requested']} best distinct trial(s) by validation score, each retrained with its own seed; "
        f"softmax outputs averaged{', each image also with its mirror image' if ens['tta'] == 'flip' else ''}. "
        "The policy comes from the study file; nothing was chosen by test accuracy."
    )
    if ens["shrunk"]:
        policy += f" The {ens['shrunk']}."
    others = "" if ens["trained"] == 1 else f", and {ens['trained'] - 1} more"
    searched_best = metrics.get("best_trial", best.number)
    which = (
        "the best of the search"
        if searched_best == best.number
        else f"within [final] speed_tie of the search's best (trial {searched_best}, "
        f"{cfg.metric} {metrics['best_trial_value']:.4f}) and faster to train"
    )
    return f"""## Final-trained: test accuracy {describe_accuracy(test, metrics["test_ci95"])}

Trial {best.number}, {which}{others}, retrained from scratch by `hpo final-train` for
{metrics["epochs"]} epochs on all {metrics["train_images"]:,} training images, then scored once on the untouched
{metrics["test_images"]:,}-image test split. {policy}

| | |
|---|---|
{table}

Trials train on the study's `train_subset` for {cfg.budget.epochs} epochs; the final run trains longer on
more images, so its test accuracy can exceed the trial's validation score.

### Params of the first member (trial {best.number})

| param | value |
|---|---|
{params}

Study artifacts: `confusion_matrix.png`, `learning_curve.png`, `misclassified.png`, `model.pt`,
`metrics.json`. Written {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}, hpo {hpo.__version__},
code {metrics["git_revision"] or "unknown"}.
"""
