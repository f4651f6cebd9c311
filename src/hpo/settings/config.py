"""Study files: TOML in, a validated, frozen StudyConfig out. The sections' dataclasses, finding a
file by name, and the checks of each section; [space] is read by `dimensions`, [sampler] and
[pruner] by `components`, each table through `reader.Table`.

Nothing under hpo.settings imports torch, so `hpo status` and the tests of bad files stay fast.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from hpo.errors import ConfigError, StudyFileNotFound
from hpo.settings.components import PRUNERS, SAMPLERS, Component, read_component
from hpo.settings.dimensions import ParamSpec, read_space, space_problems, spec_to_raw
from hpo.settings.durations import parse_duration
from hpo.settings.reader import Table, did_you_mean, not_known

METRICS = {"val_accuracy": "maximize", "val_loss": "minimize"}
SCHEDULES = ("cosine", "onecycle", "constant")
SHIPPED = Path(__file__).resolve().parents[1] / "studies"  # hpo/studies: the study files shipped in the package
SEARCH_PATHS_HELP = "studies/NAME.toml in the current directory, then the studies shipped with hpo"
TTA_MODES = ("none", "flip")
STUDY_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")
DEFAULT_TRIALS = 50  # [budget] n_trials when a study file gives none
DEFAULT_EPOCHS = 10  # [budget] epochs likewise


@dataclass(frozen=True)
class TrialBudget:
    n_trials: int = DEFAULT_TRIALS  # finished trials (COMPLETE + PRUNED) the study ends with
    epochs: int = DEFAULT_EPOCHS  # epochs per trial; the pruner sees one report per epoch
    train_subset: int = 0  # images of the training part each trial trains on; 0 = all of it
    val_fraction: float = 0.1  # share of the official training set held out for validation
    time_s: float | None = None  # wall-clock budget of search plus finalizer, seconds; None = no limit
    # With a time budget, a new study's horizon is fitted to it on the machine that creates it
    # (hpo.search.horizon.fit_horizon): longer than `epochs`, up to `max_epochs`, where the time holds the
    # finalizer's members and one whole trial more than that across the workers; shorter than
    # `epochs` where not even one trial and one final member fit.
    fit_epochs: bool = False
    max_epochs: int | None = None  # the longest fitted horizon; None: `epochs` (no longer horizon)


@dataclass(frozen=True)
class Augment:
    crop_padding: int = 0  # pixels of zero padding before a random 28x28 crop; 0 = off
    hflip: bool = False  # random horizontal flip with probability 1/2
    erase: float = 0.0  # probability of random erasing (Zhong et al. 2017) per image; 0 = off


@dataclass(frozen=True)
class TrainSettings:
    """The [train] section: how every model is trained, in trials and in the finalizer alike."""

    schedule: str = "cosine"  # learning-rate shape over the run
    warmup_epochs: float = 0.0  # linear ramp from 0 to the peak lr, in epochs
    label_smoothing: float = 0.0
    eval_batch_size: int = 2048  # images per evaluation step (no gradients, so large)
    compile: bool = False  # torch.compile the training step; off: it did not pay for itself (README)


@dataclass(frozen=True)
class FinalSettings:
    epochs: int  # epochs of the from-scratch retrain on train + validation; the trials' horizon by default
    ensemble: int = 1  # at most this many members: distinct COMPLETE trials, each joining only if it raises
    # the ensemble's validation accuracy (hpo.search.join.choose_members)
    tta: str = "none"  # "flip": also average each test image with its mirror image
    trial_models: bool = True  # each member's own trial model, trained by the search, joins its retrained copy


# [final] keys of earlier versions. Each patched the gap between short, small trials and the long
# final run; trials now train the final recipe, so a study file that still has one is told why.
REMOVED_FINAL = {
    "speed_tie": "the final run now reuses the lead trial's own measured epochs, so no faster stand-in is needed",
    "max_share": "the finalizer's reserve is now the chosen members' measured cost, not a share of the budget",
    "max_epochs": "the final run trains the trials' horizon; time the search leaves over is not turned into epochs",
    "fill": "members are now chosen on validation, so no place is filled with another seed of the best trial",
    "member_gap": "a member now joins only if it raises the ensemble's validation accuracy",
}


CHECKPOINT_KEEP = ("none", "complete")
DATA_SOURCES = ("fashion-mnist", "idx", "csv", "folder")
FOLDER_IMAGE_SIZE = 32  # [data] image_size of a folder when the file gives none


@dataclass(frozen=True)
class DataSettings:
    """The [data] section: which labelled images a study trains on (hpo.learn.sources reads them).

    `path` is a directory; `--data-dir` or HPO_DATA_DIR replaces it per host, so the study names the
    data set and each host says where its copy lies."""

    source: str = "fashion-mnist"  # fashion-mnist | idx | csv | folder
    path: str = ""  # the directory; "" with fashion-mnist: Debian's package or the download cache
    train: str = ""  # csv: the training file's name in `path` (Kaggle's layout: label, then the pixels)
    test: str = ""  # csv: the test file's name; "" = hold the test split out of the training file
    image_size: int | None = None  # folder: the side in pixels every image is resized to (default 32)
    channels: int | None = None  # folder: 1 (grey) or 3 (colour); None = as the images are, all alike
    classes: tuple[str, ...] = ()  # names of labels 0, 1, ... (idx, csv); a folder's names and order
    test_fraction: float = 0.1  # held out once, stratified and seeded, when the source has no test files


@dataclass(frozen=True)
class Checkpoints:
    """Trial checkpoints in the artifact store: what a crashed trial resumes from."""

    every_epoch: bool = True  # save the model and optimizer after every epoch but the last
    keep: str = "none"  # none: delete when the trial ends; complete: keep a COMPLETE trial's last one


@dataclass(frozen=True)
class WarmStart:
    """Configurations the study tries first (Optuna's enqueue_trial), queued when the study is created."""

    from_study: str | None = None  # `from`: a study in the same storage, with the same metric
    top: int = 5  # how many of its best distinct COMPLETE trials
    params: tuple[dict[str, Any], ...] = ()  # configurations known to be good, tried first, in order


@dataclass(frozen=True)
class StudyConfig:
    name: str
    direction: str
    metric: str
    seed: int
    budget: TrialBudget
    sampler: Component
    pruner: Component
    augment: Augment
    train: TrainSettings
    final: FinalSettings
    space: dict[str, ParamSpec]
    description: str = ""
    checkpoints: Checkpoints = Checkpoints()
    warm_start: WarmStart = WarmStart()
    data: DataSettings = DataSettings()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able form, stored in the study so later commands need no file."""
        raw = dataclasses.asdict(self)
        raw["space"] = {k: spec_to_raw(v) for k, v in self.space.items()}
        raw["warm_start"]["params"] = [dict(p) for p in self.warm_start.params]
        raw["data"]["classes"] = list(self.data.classes)
        return raw

    def space_dict(self) -> dict[str, Any]:
        return self.to_dict()["space"]


# --------------------------------------------------------------------------- finding files


def is_path(study: str) -> bool:
    """Whether a --study argument names a file (`x.toml`, `dir/x`) rather than a study."""
    return Path(study).suffix == ".toml" or os.sep in study


def resolve_path(study: str, cwd: Path | None = None) -> Path:
    """`study` is a path to a TOML file or a name looked up in studies/."""
    cwd = cwd or Path.cwd()
    as_path = Path(study)
    if is_path(study):
        if as_path.is_file():
            return as_path
        raise StudyFileNotFound(f"study file {study} does not exist. Check the path, or pass a study name.")
    candidates = [cwd / "studies" / f"{study}.toml", SHIPPED / f"{study}.toml"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    known = sorted({p.stem for c in candidates for p in c.parent.glob("*.toml")})
    hint = did_you_mean(study, known)
    raise StudyFileNotFound(
        f"no study file named {study!r}: looked for {SEARCH_PATHS_HELP}.{hint} "
        f"Known studies: {', '.join(known) or 'none'}."
    )


def load(study: str | Path) -> StudyConfig:
    path = resolve_path(str(study))
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e}). Fix the syntax.") from e
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the study file ({e.strerror}).") from e
    return parse(raw, source=str(path))


# --------------------------------------------------------------------------- validation


def parse(raw: dict[str, Any], source: str = "<study>", check_options: bool = True) -> StudyConfig:
    """A study file's tables as a StudyConfig: each section read by its dataclass, then checked
    (`check_options=False`: the sampler's and pruner's options as they are, see read_component)."""
    top = Table(raw, "", source)
    name, description, metric, direction, seed = _header(top)
    budget_table = top.table("budget")
    budget = _check_budget(budget_table, budget_table.section(TrialBudget, time_s=_duration(budget_table, "time")))
    sampler = read_component(top.table("sampler"), SAMPLERS, "tpe", "optuna.samplers", check_options)
    pruner = read_component(top.table("pruner"), PRUNERS, "median", "optuna.pruners", check_options)
    augment_table = top.table("augment")
    augment = _check_augment(augment_table, augment_table.section(Augment))
    train_table = top.table("train")
    train = _check_train(train_table, train_table.section(TrainSettings))
    final_table = top.table("final")
    for key, why in REMOVED_FINAL.items():
        if key in final_table.raw:
            final_table.fail(f"{key} was removed: {why}. Delete the line.")
    final = _check_final(final_table, final_table.section(FinalSettings, defaults={"epochs": budget.epochs}))
    warm_table = top.table("warm_start")
    warm = warm_table.section(WarmStart, keys={"from_study": "from"}, params=tuple(warm_table.get("params", list, [])))
    if warm.top < 1:
        warm_table.fail(f"top must be at least 1, got {warm.top}")
    checkpoint_table = top.table("checkpoints")
    checkpoints = checkpoint_table.section(Checkpoints)
    if checkpoints.keep not in CHECKPOINT_KEEP:
        checkpoint_table.fail(not_known("keep", checkpoints.keep, CHECKPOINT_KEEP))
    data_table = top.table("data")
    data = _check_data(data_table, data_table.section(DataSettings, classes=_classes(data_table)))
    space = read_space(top.table("space"), data.image_size or 28)  # idx and csv images are checked against it when read
    for i, params in enumerate(warm.params):
        problems = space_problems(space, params) if isinstance(params, dict) else ["not a table"]
        if problems:
            warm_table.fail(
                f"params[{i}] is not a point of [space]: {'; '.join(problems)}. Fix the value, or widen [space]."
            )
    top.done(tuple(final_table.name for final_table in dataclasses.fields(StudyConfig)))
    parts = (name, direction, metric, seed, budget, sampler, pruner, augment, train, final, space, description)
    return StudyConfig(*parts, checkpoints=checkpoints, warm_start=warm, data=data)


def _classes(table: Table) -> tuple[str, ...]:
    classes = table.get("classes", list, [])
    if not all(isinstance(c, str) and c for c in classes):
        table.fail(f"classes must be a list of non-empty names, got {classes!r}")
    if len(set(classes)) != len(classes):
        table.fail(f"classes must name each class once, got {classes!r}")
    return tuple(classes)


def _check_data(table: Table, data: DataSettings) -> DataSettings:
    if data.source not in DATA_SOURCES:
        table.fail(not_known("source", data.source, DATA_SOURCES))
    given: dict[str, Any] = {"path": data.path, "train": data.train, "test": data.test}
    given.update(image_size=data.image_size, channels=data.channels, classes=data.classes)
    allowed = {
        "fashion-mnist": ("path",),
        "idx": ("path", "classes"),
        "csv": ("path", "train", "test", "classes"),
        "folder": ("path", "image_size", "channels", "classes"),
    }[data.source]
    for key, value in given.items():
        if value not in ("", None, ()) and key not in allowed:
            table.fail(f"{key} does not apply to source {data.source!r} (it takes {', '.join(allowed)}). Remove it")
    if data.source != "fashion-mnist" and not data.path:
        table.fail(f"source {data.source!r} needs path: the directory that holds the data (--data-dir overrides it)")
    if data.source == "csv" and not data.train:
        table.fail('source "csv" needs train: the training file\'s name in path, e.g. train = "train.csv"')
    if data.source == "folder":
        size = FOLDER_IMAGE_SIZE if data.image_size is None else data.image_size
        if not 4 <= size <= 512:
            table.fail(f"image_size must be from 4 to 512 pixels, got {size}")
        if data.channels not in (None, 1, 3):
            table.fail(f"channels must be 1 (grey) or 3 (colour), got {data.channels}")
        data = replace(data, image_size=size)
    if not 0.0 < data.test_fraction < 0.5:
        table.fail(f"test_fraction must be between 0 and 0.5, got {data.test_fraction}")
    return data


def _header(top: Table) -> tuple[str, str, str, str, int]:
    """The file's top-level keys: name, description, metric, direction (fixed by the metric) and seed."""
    name = top.get("name", str)
    if not STUDY_NAME.fullmatch(name):
        # The name becomes part of file paths (runs/NAME/, lock files beside the database).
        top.fail(
            f"name must be letters, digits, '.', '_' or '-' (at most 64, not starting with '.'), got {name!r}. "
            "Rename the study."
        )
    description = top.get("description", str, "")
    metric = top.get("metric", str, "val_accuracy")
    if metric not in METRICS:
        top.fail(not_known("metric", metric, list(METRICS), "is not supported"))
    direction = top.get("direction", str, METRICS[metric])
    if direction != METRICS[metric]:
        top.fail(f"direction for {metric} must be {METRICS[metric]!r}, got {direction!r}")
    return name, description, metric, direction, top.get("seed", int, 0)


def _check_budget(table: Table, budget: TrialBudget) -> TrialBudget:
    if budget.n_trials < 1:
        table.fail(f"n_trials must be at least 1, got {budget.n_trials}")
    if budget.epochs < 1:
        table.fail(f"epochs must be at least 1, got {budget.epochs}")
    if budget.train_subset < 0:
        table.fail(f"train_subset must be 0 (all) or a positive number of images, got {budget.train_subset}")
    if not 0.0 < budget.val_fraction < 0.5:
        table.fail(f"val_fraction must be between 0 and 0.5, got {budget.val_fraction}")
    if budget.max_epochs is not None and budget.max_epochs < budget.epochs:
        table.fail(f"max_epochs must be at least epochs ({budget.epochs}), got {budget.max_epochs}")
    if budget.max_epochs is not None and not budget.fit_epochs:
        table.fail("max_epochs needs fit_epochs = true: only a horizon fitted to a time budget grows. Add it")
    return budget


def _check_augment(table: Table, augment: Augment) -> Augment:
    if not 0 <= augment.crop_padding <= 8:
        table.fail(f"crop_padding must be between 0 and 8 pixels, got {augment.crop_padding}")
    if not 0.0 <= augment.erase <= 1.0:
        table.fail(f"erase must be a probability in [0, 1], got {augment.erase}")
    return augment


def _check_train(table: Table, train: TrainSettings) -> TrainSettings:
    if train.schedule not in SCHEDULES:
        table.fail(not_known("schedule", train.schedule, SCHEDULES))
    if not 0.0 <= train.label_smoothing < 1.0:
        table.fail(f"label_smoothing must be in [0, 1), got {train.label_smoothing}")
    if train.warmup_epochs < 0:
        table.fail(f"warmup_epochs must not be negative, got {train.warmup_epochs}")
    if train.eval_batch_size < 1:
        table.fail(f"eval_batch_size must be positive, got {train.eval_batch_size}")
    return train


def _check_final(table: Table, final: FinalSettings) -> FinalSettings:
    if final.epochs < 1:
        table.fail(f"epochs must be at least 1, got {final.epochs}")
    if final.ensemble < 1:
        table.fail(f"ensemble must be at least 1 (one model), got {final.ensemble}")
    if final.tta not in TTA_MODES:
        table.fail(not_known("tta", final.tta, TTA_MODES))
    return final


def _duration(table: Table, key: str) -> float | None:
    """A duration key: "10m" in a file, seconds (a number) once stored in a study."""
    value = table.get(key, (str, float), None)
    if value is None:
        return None
    try:
        return parse_duration(str(value))
    except ValueError as e:
        table.fail(f"{key}: {e}")
    raise AssertionError("unreachable")


def from_dict(stored: dict[str, Any], source: str) -> StudyConfig:
    """Rebuild a config recorded in a study (the inverse of StudyConfig.to_dict). The sampler's and
    pruner's options are not checked here: they are built (and their errors reported) only where a
    search runs, so a study they no longer build for (after an Optuna upgrade) can still be read."""
    raw = dict(stored)
    for key in ("budget", "augment", "train", "final", "checkpoints", "warm_start", "data"):
        raw[key] = {k: v for k, v in stored[key].items() if v is not None}  # None: the file left it out
    if "from_study" in raw["warm_start"]:
        raw["warm_start"]["from"] = raw["warm_start"].pop("from_study")
    if "time_s" in raw["budget"]:
        raw["budget"]["time"] = raw["budget"].pop("time_s")
    raw["sampler"] = {"name": stored["sampler"]["name"], **stored["sampler"]["options"]}
    raw["pruner"] = {"name": stored["pruner"]["name"], **stored["pruner"]["options"]}
    return parse(raw, source=source, check_options=False)


def with_horizon(cfg: StudyConfig, epochs: int) -> StudyConfig:
    """The study with a horizon of `epochs`; a final run that trained the horizon trains the new one."""
    final_epochs = epochs if cfg.final.epochs == cfg.budget.epochs else min(cfg.final.epochs, epochs)
    return replace(cfg, budget=replace(cfg.budget, epochs=epochs), final=replace(cfg.final, epochs=final_epochs))


def summary(cfg: StudyConfig) -> str:
    """The study's settings in one line, as a person would say them."""
    budget, final = cfg.budget, cfg.final
    images = f"{budget.train_subset:,} images" if budget.train_subset else "the whole training part"
    limits = [f"{budget.n_trials} finished"] + ([f"{budget.time_s / 60:g} min"] if budget.time_s else [])
    ensemble = f", ensemble of {final.ensemble}" if final.ensemble > 1 else ""
    tta = f", {final.tta} TTA" if final.tta != "none" else ""
    return (
        f"{cfg.direction} {cfg.metric}; trials of {budget.epochs} epochs on {images} until {' or '.join(limits)}; "
        f"{cfg.sampler.name} sampler, {cfg.pruner.name} pruner; final: {final.epochs} epochs{ensemble}{tta}"
    )
