"""Study files: TOML in, a validated, frozen StudyConfig out.

This module never imports torch, so `hpo status` and the tests of bad files stay fast.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import json
import math
import os
import re
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from hpo.errors import ConfigError, StudyFileNotFound

# The parameters DynamicCNN and the training recipe understand, in the order they are suggested.
SPACE_KEYS = (
    "n_conv",  # conv blocks, each halves the image: 28 -> 14 -> 7 -> 3 -> 1, so at most 4
    "filters",  # output channels, suggested once per conv block
    "kernel_size",  # odd, pixels
    "n_fc",  # hidden fully connected layers before the classifier
    "fc_size",  # units per hidden FC layer
    "dropout",  # probability, after every hidden FC layer
    "optimizer",  # adam | sgd | rmsprop
    "lr",  # peak learning rate
    "batch_size",  # images per step
    "weight_decay",  # L2 coefficient
)
# Optional: a space without them has plain conv blocks, one width per block and a flattening head.
OPTIONAL_SPACE_KEYS = (
    "growth",  # width factor per block: filters sets the first block's width, each next one is growth times wider
    "residual",  # true: each conv block is a residual basic block (two convs and a shortcut)
    "pool",  # flatten | avg: the head flattens the last feature map or averages it over its pixels
)
POOLS = ("flatten", "avg")
OPTIMIZERS = ("adam", "sgd", "rmsprop")
METRICS = {"val_accuracy": "maximize", "val_loss": "minimize"}
SCHEDULES = ("cosine", "onecycle", "constant")
SAMPLERS = {"tpe": "TPESampler", "random": "RandomSampler", "qmc": "QMCSampler"}
PRUNERS = {
    "median": "MedianPruner",
    "percentile": "PercentilePruner",
    "successive_halving": "SuccessiveHalvingPruner",
    "hyperband": "HyperbandPruner",
    "none": "NopPruner",
}
SHIPPED = Path(__file__).resolve().parents[1] / "studies"  # hpo/studies: the study files shipped in the package
SEARCH_PATHS_HELP = "studies/NAME.toml in the current directory, then the studies shipped with hpo"
TTA_MODES = ("none", "flip")
_DURATION = re.compile(r"(\d+(?:\.\d*)?)\s*(h|m|s)")
DURATION_HELP = "a duration such as 90s, 10m, 1h or 1h30m"


STUDY_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")
DEFAULT_TRIALS = 50  # [budget] n_trials when a study file gives none
DEFAULT_EPOCHS = 10  # [budget] epochs likewise


def format_duration(seconds: float | None) -> str:
    """ "1h05m", "4m00s", "42s": how a duration is printed everywhere (the inverse of parse_duration)."""
    if seconds is None:
        return "unknown"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def parse_duration(text: str) -> float:
    """Seconds in "10m", "1h30m", "90s" or "45" (seconds); raises ValueError naming the problem."""
    cleaned = text.strip().lower()
    if re.fullmatch(r"\d+(?:\.\d*)?", cleaned):
        seconds = float(cleaned)
    else:
        parts = _DURATION.findall(cleaned)
        if not parts or _DURATION.sub("", cleaned).strip():
            raise ValueError(f"{text!r} is not {DURATION_HELP}")
        seconds = sum(float(n) * {"h": 3600, "m": 60, "s": 1}[unit] for n, unit in parts)
    if not seconds > 0:
        raise ValueError(f"{text!r} is not a positive duration; give {DURATION_HELP}")
    return seconds


def env_int(name: str, default: int, least: int, unit: str = "") -> int:
    """An integer from environment variable `name` (unset or empty: `default`), or a ConfigError
    naming the variable, what it holds and what it must be."""
    return int(_env_number(name, default, least, unit, integer=True))


def env_float(name: str, default: float, least: float, unit: str = "") -> float:
    return _env_number(name, default, least, unit, integer=False)


def _env_number(name: str, default: float, least: float, unit: str, integer: bool) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw) if integer else float(raw)
        ok = math.isfinite(value) and value >= least
    except ValueError:
        ok = False
    if not ok:
        what = "an integer" if integer else "a number"
        raise ConfigError(
            f"{name}={raw!r} is not {what} of at least {least:g}{' ' + unit if unit else ''}. "
            f"Fix it, or unset it for the default ({default:g})."
        )
    return value


@dataclass(frozen=True)
class ParamSpec:
    """One search dimension: a numeric range, a list of choices, or a fixed value."""

    name: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple[Any, ...] | None = None
    # lr only: one range per optimizer, sampled under its own name (lr_adam, lr_sgd, lr_rmsprop)
    by_optimizer: tuple[tuple[str, ParamSpec], ...] | None = None

    def for_optimizer(self, optimizer: str) -> ParamSpec:
        """The range that applies with `optimizer`: its own, or the shared one."""
        if self.by_optimizer is None:
            return self
        return dict(self.by_optimizer)[optimizer]

    @property
    def span(self) -> tuple[float, float]:
        """low and high of a range (not of a choice list)."""
        if self.low is None or self.high is None:
            raise ValueError(f"{self.name} is a choice list, not a range")
        return self.low, self.high

    @property
    def is_int(self) -> bool:
        return isinstance(self.low, int) and isinstance(self.high, int)


@dataclass(frozen=True)
class TrialBudget:
    n_trials: int = DEFAULT_TRIALS  # finished trials (COMPLETE + PRUNED) the study ends with
    epochs: int = DEFAULT_EPOCHS  # epochs per trial; the pruner sees one report per epoch
    train_subset: int = 0  # images of the training part each trial trains on; 0 = all of it
    val_fraction: float = 0.1  # share of the official training set held out for validation
    time_s: float | None = None  # wall-clock budget of search plus finalizer, seconds; None = no limit
    # With a time budget, a new study's horizon is fitted to it on the machine that creates it
    # (hpo.search.budget.fit_horizon): longer than `epochs`, up to `max_epochs`, where the time holds the
    # finalizer's members and one whole trial more than that across the workers; shorter than
    # `epochs` where not even one trial and one final member fit.
    fit_epochs: bool = False
    max_epochs: int | None = None  # the longest fitted horizon; None: `epochs` (no longer horizon)


@dataclass(frozen=True)
class Component:
    """A sampler or pruner: an Optuna class name key and its keyword arguments."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)


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
    # the ensemble's validation accuracy (hpo.results.members.choose_members)
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
        raw["space"] = {k: _spec_to_raw(v) for k, v in self.space.items()}
        raw["warm_start"]["params"] = [dict(p) for p in self.warm_start.params]
        raw["data"]["classes"] = list(self.data.classes)
        return raw

    def space_dict(self) -> dict[str, Any]:
        return self.to_dict()["space"]


def _spec_to_raw(spec: ParamSpec) -> Any:
    if spec.by_optimizer is not None:
        return {name: _spec_to_raw(sub) for name, sub in spec.by_optimizer}
    if spec.choices is not None:
        return {"choices": list(spec.choices)}
    if spec.low == spec.high and not spec.log and spec.step is None:
        return spec.low
    raw: dict[str, Any] = {"low": spec.low, "high": spec.high}
    if spec.log:
        raw["log"] = True
    if spec.step is not None:
        raw["step"] = spec.step
    return raw


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
    hint = _did_you_mean(study, known)
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


def _not_known(key: str, value: str, options: list[str] | tuple[str, ...], verb: str = "is not known") -> str:
    return f"{key} {value!r} {verb}.{_did_you_mean(value, options)} Use one of: {', '.join(options)}"


def _did_you_mean(word: str, options: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


# A dataclass field's annotation (a string, under `from __future__ import annotations`) -> the TOML type.
_KINDS: dict[str, type] = {
    "int": int,
    "float": float,
    "bool": bool,
    "str": str,
    "int | None": int,
    "float | None": float,
    "str | None": str,
}


class _Reader:
    """Walks one table of the file, checking types and refusing keys nobody reads."""

    def __init__(self, raw: Any, where: str, source: str):
        self.source, self.where = source, where
        if not isinstance(raw, dict):
            self.fail(f"must be a table, got {type(raw).__name__}")
        self.raw = dict(raw)
        self.used: set[str] = set()

    def fail(self, message: str) -> None:
        where = f"[{self.where}] " if self.where else ""
        raise ConfigError(f"{self.source}: {where}{message}")

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        self.used.add(key)
        if key not in self.raw:
            if default is ...:
                self.fail(f"missing required key {key!r}")
            return default
        value = self.raw[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # TOML ints are valid floats; bools are not numbers here.
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            names = " or ".join(k.__name__ for k in kinds)
            self.fail(f"{key} must be {names}, got {type(value).__name__} {value!r}")
        return value

    def section(
        self, cls: Any, keys: dict[str, str] | None = None, defaults: dict[str, Any] | None = None, **given: Any
    ) -> Any:
        """The dataclass `cls` read from this table: every field under its name (or `keys[field]`), of
        its annotated type, with its default (or `defaults[field]`); `given` fields are the caller's.
        Any other key in the table is refused."""
        keys, defaults = keys or {}, defaults or {}
        values = dict(given)
        for spec_field in dataclasses.fields(cls):
            if spec_field.name in given:
                continue
            default = defaults.get(spec_field.name, spec_field.default)
            values[spec_field.name] = self.get(
                keys.get(spec_field.name, spec_field.name),
                _KINDS[str(spec_field.type)],
                ... if default is dataclasses.MISSING else default,
            )
        self.done()
        return cls(**values)

    def table(self, key: str) -> _Reader:
        self.used.add(key)
        where = f"{self.where}.{key}" if self.where else key
        return _Reader(self.raw.get(key, {}), where, self.source)

    def done(self, known: tuple[str, ...] | None = None) -> None:
        for key in self.raw:
            if key not in self.used:
                hint = _did_you_mean(key, list(known or self.used))
                self.fail(f"unknown key {key!r}.{hint} Remove it or fix its spelling.")


def parse(raw: dict[str, Any], source: str = "<study>", check_options: bool = True) -> StudyConfig:
    """A study file's tables as a StudyConfig: each section read by its dataclass, then checked
    (`check_options=False`: the sampler's and pruner's options as they are, see _component)."""
    top = _Reader(raw, "", source)
    name, description, metric, direction, seed = _header(top)
    budget_table = top.table("budget")
    budget = _check_budget(budget_table, budget_table.section(TrialBudget, time_s=_duration(budget_table, "time")))
    sampler = _component(top.table("sampler"), SAMPLERS, "tpe", "optuna.samplers", check_options)
    pruner = _component(top.table("pruner"), PRUNERS, "median", "optuna.pruners", check_options)
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
        checkpoint_table.fail(_not_known("keep", checkpoints.keep, CHECKPOINT_KEEP))
    data_table = top.table("data")
    data = _check_data(data_table, data_table.section(DataSettings, classes=_classes(data_table)))
    space = _space(top.table("space"), data)
    for i, params in enumerate(warm.params):
        problems = space_problems(space, params) if isinstance(params, dict) else ["not a table"]
        if problems:
            warm_table.fail(
                f"params[{i}] is not a point of [space]: {'; '.join(problems)}. Fix the value, or widen [space]."
            )
    top.done(tuple(final_table.name for final_table in dataclasses.fields(StudyConfig)))
    parts = (name, direction, metric, seed, budget, sampler, pruner, augment, train, final, space, description)
    return StudyConfig(*parts, checkpoints=checkpoints, warm_start=warm, data=data)


def _classes(table: _Reader) -> tuple[str, ...]:
    classes = table.get("classes", list, [])
    if not all(isinstance(c, str) and c for c in classes):
        table.fail(f"classes must be a list of non-empty names, got {classes!r}")
    if len(set(classes)) != len(classes):
        table.fail(f"classes must name each class once, got {classes!r}")
    return tuple(classes)


def _check_data(table: _Reader, data: DataSettings) -> DataSettings:
    if data.source not in DATA_SOURCES:
        table.fail(_not_known("source", data.source, DATA_SOURCES))
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


def _header(top: _Reader) -> tuple[str, str, str, str, int]:
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
        top.fail(_not_known("metric", metric, list(METRICS), "is not supported"))
    direction = top.get("direction", str, METRICS[metric])
    if direction != METRICS[metric]:
        top.fail(f"direction for {metric} must be {METRICS[metric]!r}, got {direction!r}")
    return name, description, metric, direction, top.get("seed", int, 0)


def _check_budget(table: _Reader, budget: TrialBudget) -> TrialBudget:
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


def _check_augment(table: _Reader, augment: Augment) -> Augment:
    if not 0 <= augment.crop_padding <= 8:
        table.fail(f"crop_padding must be between 0 and 8 pixels, got {augment.crop_padding}")
    if not 0.0 <= augment.erase <= 1.0:
        table.fail(f"erase must be a probability in [0, 1], got {augment.erase}")
    return augment


def _check_train(table: _Reader, train: TrainSettings) -> TrainSettings:
    if train.schedule not in SCHEDULES:
        table.fail(_not_known("schedule", train.schedule, SCHEDULES))
    if not 0.0 <= train.label_smoothing < 1.0:
        table.fail(f"label_smoothing must be in [0, 1), got {train.label_smoothing}")
    if train.warmup_epochs < 0:
        table.fail(f"warmup_epochs must not be negative, got {train.warmup_epochs}")
    if train.eval_batch_size < 1:
        table.fail(f"eval_batch_size must be positive, got {train.eval_batch_size}")
    return train


def _check_final(table: _Reader, final: FinalSettings) -> FinalSettings:
    if final.epochs < 1:
        table.fail(f"epochs must be at least 1, got {final.epochs}")
    if final.ensemble < 1:
        table.fail(f"ensemble must be at least 1 (one model), got {final.ensemble}")
    if final.tta not in TTA_MODES:
        table.fail(_not_known("tta", final.tta, TTA_MODES))
    return final


def _holds(spec: ParamSpec, value: Any) -> bool:
    if spec.choices is not None:
        return value in spec.choices
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if spec.is_int and not float(value).is_integer():
        return False
    low, high = spec.span
    return low <= value <= high


def space_problems(space: dict[str, ParamSpec], params: dict[str, Any]) -> list[str]:
    """Why `params` is not a configuration of `space`, one phrase per parameter (empty: it is).
    Parameters left out are sampled as usual; `filters_i` follow `filters` up to n_conv."""
    problems = []
    n_conv = params.get(
        "n_conv", space["n_conv"].span[1] if space["n_conv"].choices is None else max(space["n_conv"].choices)
    )
    per = dict(space["lr"].by_optimizer or ())
    for key, value in params.items():
        name = "filters" if key.startswith("filters_") and key[8:].isdigit() else key
        if key.startswith("lr_") and key[3:] in per:
            name, spec = "lr", per[key[3:]]
        else:
            spec = space.get(name, ParamSpec(name))
        widths = n_conv if "growth" not in space else 1  # growth derives every width after the first
        if per and key == "lr":
            own = f"lr_{params.get('optimizer', 'adam')}"
            problems.append(f"lr: this space gives each optimizer its own range; name it {own}")
        elif name == "lr" and key != "lr" and params.get("optimizer", key[3:]) != key[3:]:
            problems.append(f"{key} is the range of {key[3:]}, but optimizer = {params['optimizer']!r}")
        elif name not in space or name == "filters" and int(key[8:]) >= widths:
            problems.append(f"{key} is not a parameter of this space")
        elif not _holds(spec, value):
            allowed = (
                f"one of {list(spec.choices)}"
                if spec.choices is not None
                else f"{spec.low}"
                if spec.low == spec.high
                else f"from {spec.low} to {spec.high}"
            )
            problems.append(f"{key} = {value!r}, but the space allows {allowed}")
    return problems


def _duration(table: _Reader, key: str) -> float | None:
    """A duration key: "10m" in a file, seconds (a number) once stored in a study."""
    value = table.get(key, (str, float), None)
    if value is None:
        return None
    try:
        return parse_duration(str(value))
    except ValueError as e:
        table.fail(f"{key}: {e}")
    raise AssertionError("unreachable")


# What a study file may give each sampler or pruner option: (kind, least, most, also allowed).
# Optuna checks some of these only when a trial is pruned, and some never; a study whose settings
# cannot build would stop every command that loads it, so they are checked before anything is stored.
_OPTION_RULES: dict[str, tuple[str, float | None, float | None, tuple[Any, ...]]] = {
    "n_startup_trials": ("int", 0, None, ()),
    "n_warmup_steps": ("int", 0, None, ()),
    "interval_steps": ("int", 1, None, ()),
    "n_min_trials": ("int", 1, None, ()),
    "percentile": ("float", 0.0, 100.0, ()),
    "min_resource": ("int", 1, None, ("auto",)),
    "max_resource": ("int", 1, None, ("auto",)),
    "reduction_factor": ("int", 2, None, ()),
    "min_early_stopping_rate": ("int", 0, None, ()),
    "bootstrap_count": ("int", 0, None, ()),
    "n_ei_candidates": ("int", 1, None, ()),
    "prior_weight": ("float", 1e-12, None, ()),
    "qmc_type": ("str", None, None, ("sobol", "halton")),
}
_BOOL_OPTIONS = (
    "multivariate",
    "constant_liar",
    "group",
    "consider_prior",
    "consider_magic_clip",
    "consider_endpoints",
    "scramble",
    "warn_independent_sampling",
    "warn_asynchronous_seeding",
)


def _allowed(rule: tuple[str, float | None, float | None, tuple[Any, ...]]) -> str:
    kind, least, most, also = rule
    if kind == "str":
        return "one of " + ", ".join(repr(v) for v in also)
    what = "an integer" if kind == "int" else "a number"
    if least is not None and most is not None:
        what += f" from {least:g} to {most:g}"
    elif least is not None:
        what += " above 0" if kind == "float" and 0 < least < 1e-6 else f" of at least {least:g}"
    return what + "".join(f" or {v!r}" for v in also)


def _option_problem(key: str, value: Any) -> str | None:
    """Why `value` is not a valid value of option `key`, as the allowed range; None if it is."""
    if key in _BOOL_OPTIONS:
        return None if isinstance(value, bool) else "true or false"
    rule = _OPTION_RULES.get(key)
    if rule is None:
        return None
    kind, least, most, also = rule
    if kind == "str" or (isinstance(value, str) and value in also):
        return None if value in also else _allowed(rule)
    if isinstance(value, bool) or not isinstance(value, int if kind == "int" else (int, float)):
        return _allowed(rule)
    in_range = math.isfinite(value) and (least is None or value >= least) and (most is None or value <= most)
    return None if in_range else _allowed(rule)


def _component(
    table: _Reader, known: dict[str, str], default: str, module: str, check_options: bool = True
) -> Component:
    """A [sampler] or [pruner] table. `check_options=False` (settings already stored in a study) keeps
    the options as they are, so a study that no longer builds can still be listed, shown and deleted."""
    name = table.get("name", str, default)
    if name not in known:
        table.fail(_not_known("name", name, list(known)))
    options = {k: value for k, value in table.raw.items() if k != "name"}
    if check_options:
        _check_options(table, known[name], module, options)
    if name == "tpe":
        # Parallel workers need constant_liar or they pile onto the same promising point; multivariate
        # TPE models the parameters jointly. Both are right for this service's parallel workers.
        options = {"multivariate": True, "constant_liar": True, **options}
    return Component(name=name, options=options)


def _check_options(table: _Reader, class_name: str, module: str, options: dict[str, Any]) -> None:
    """Each option is a keyword of the class, of an allowed value, and the class builds with them."""
    import importlib
    import warnings

    cls = getattr(importlib.import_module(module), class_name)
    accepted = [p for p in inspect.signature(cls).parameters if p not in ("self", "seed")]
    for key, value in options.items():
        if key not in accepted:
            table.fail(
                f"{class_name} has no option {key!r}.{_did_you_mean(key, accepted)} Options: {', '.join(accepted)}"
            )
        if isinstance(value, (dict, list)):
            table.fail(f"{key} = {value!r}: {class_name}'s {key} cannot be given in a study file. Remove it.")
        problem = _option_problem(key, value)
        if problem is not None:
            table.fail(f"{key} = {_toml_value(value)} is out of range: {class_name} needs {problem}. Fix the value.")
    required = [
        name
        for name, p in inspect.signature(cls).parameters.items()
        if p.default is inspect.Parameter.empty and p.kind is p.POSITIONAL_OR_KEYWORD and name != "self"
    ]
    missing = [name for name in required if name not in options]
    if missing:
        table.fail(f"{class_name} needs {', '.join(missing)}: add it, e.g. {missing[0]} = ... under [{table.where}].")
    base = {name: options[name] for name in required}  # PercentilePruner cannot build without its percentile
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation notices: the option still works
        for key, value in options.items():  # one at a time first, so the message names the option
            try:
                cls(**{**base, key: value})
            except Exception as e:  # Optuna raises ValueError or TypeError, or others
                table.fail(f"{key} = {_toml_value(value)} is refused by {class_name}: {e}. Fix the value.")
        try:
            cls(**options)
        except Exception as e:
            given = ", ".join(f"{k} = {_toml_value(v)}" for k, v in options.items())
            table.fail(f"{class_name} refuses these options together ({given}): {e}. Fix one of them.")


def _space(table: _Reader, data: DataSettings = DataSettings()) -> dict[str, ParamSpec]:
    space: dict[str, ParamSpec] = {}
    known = SPACE_KEYS + OPTIONAL_SPACE_KEYS
    for key in table.raw:
        if key not in known:
            table.fail(f"unknown parameter {key!r}.{_did_you_mean(key, known)} Parameters: {', '.join(known)}")
    for key in known:
        if key not in table.raw:
            if key in OPTIONAL_SPACE_KEYS:
                continue
            table.fail(f"missing parameter {key!r}; give a range, a choice list or a fixed value")
        raw = table.raw[key]
        if key == "lr" and isinstance(raw, dict) and raw and set(raw) <= set(OPTIMIZERS):
            space[key] = _per_optimizer(raw, table)
        else:
            space[key] = _param(key, raw, table)
    _check_domain(space, table)
    side = data.image_size or 28  # idx and csv images are checked against it when they are read
    deepest = max(_values(space["n_conv"]))
    if isinstance(deepest, int) and side >> deepest < 1:
        table.fail(f"n_conv {deepest} halves a {side}px image {deepest} times, below 1px. Lower n_conv")
    return space


def _per_optimizer(raw: dict[str, Any], table: _Reader) -> ParamSpec:
    """lr = { adam = { low = ..., high = ... }, sgd = ... }: each optimizer's own range."""
    subs = tuple((name, _param(f"lr_{name}", raw[name], table)) for name in OPTIMIZERS if name in raw)
    return ParamSpec("lr", by_optimizer=subs)


def _param(key: str, raw: Any, table: _Reader) -> ParamSpec:
    where = f"{key}"
    if isinstance(raw, bool):
        return ParamSpec(key, choices=(raw,))
    if isinstance(raw, (int, float, str)):
        return ParamSpec(key, choices=(raw,)) if isinstance(raw, str) else ParamSpec(key, low=raw, high=raw)
    if not isinstance(raw, dict):
        table.fail(
            f"{where} must be a table like {{ low = 1, high = 4 }}, {{ choices = [...] }} or a value, got {raw!r}"
        )
    extra = set(raw) - {"low", "high", "log", "step", "choices"}
    if extra:
        bad = sorted(extra)[0]
        table.fail(f"{where} has unknown key {bad!r}.{_did_you_mean(bad, ['low', 'high', 'log', 'step', 'choices'])}")
    if "choices" in raw:
        choices = raw["choices"]
        if set(raw) != {"choices"}:
            table.fail(f"{where}: use either choices or low/high, not both")
        if not isinstance(choices, list) or not choices:
            table.fail(f"{where}: choices must be a non-empty list, got {choices!r}")
        if len({type(c) for c in choices}) != 1:
            table.fail(f"{where}: choices must all have one type, got {choices!r}")
        return ParamSpec(key, choices=tuple(choices))
    for bound in ("low", "high"):
        if bound not in raw:
            table.fail(f"{where} needs both low and high (or choices)")
        if isinstance(raw[bound], bool) or not isinstance(raw[bound], (int, float)):
            table.fail(f"{where}.{bound} must be a number, got {raw[bound]!r}")
    low, high = raw["low"], raw["high"]
    log, step = raw.get("log", False), raw.get("step")
    if not isinstance(log, bool):
        table.fail(f"{where}.log must be true or false, got {log!r}")
    if isinstance(low, int) != isinstance(high, int):
        low, high = float(low), float(high)
    if low > high:
        table.fail(f"{where}: low ({low}) is greater than high ({high}). Swap them.")
    if log and low <= 0:
        table.fail(f"{where}: a log range must be above 0, got low = {low}. Use a small positive low such as 1e-6.")
    if step is not None:
        if isinstance(step, bool) or not isinstance(step, (int, float)) or step <= 0:
            table.fail(f"{where}.step must be a positive number, got {step!r}")
        if log:
            table.fail(f"{where}: step and log cannot be combined")
    return ParamSpec(key, low=low, high=high, log=log, step=step)


def _values(spec: ParamSpec) -> list[Any]:
    """The extremes a parameter can take, for range checks."""
    if spec.by_optimizer is not None:
        return [value for _, sub in spec.by_optimizer for value in _values(sub)]
    return list(spec.choices) if spec.choices is not None else [spec.low, spec.high]


def _check_domain(space: dict[str, ParamSpec], table: _Reader) -> None:
    def need(key: str, ok: Any, what: str) -> None:
        if key not in space:
            return
        bad = [value for value in _values(space[key]) if not ok(value)]
        if bad:
            table.fail(f"{key} must be {what}, got {bad[0]!r}")

    def integer(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    need("n_conv", lambda value: integer(value) and 1 <= value <= 4, "an integer from 1 to 4 (each block halves 28x28)")
    need("filters", lambda value: integer(value) and 1 <= value <= 1024, "an integer from 1 to 1024")
    need("kernel_size", lambda value: integer(value) and value in (1, 3, 5, 7), "1, 3, 5 or 7")
    need("n_fc", lambda value: integer(value) and 0 <= value <= 4, "an integer from 0 to 4")
    need("fc_size", lambda value: integer(value) and 1 <= value <= 8192, "an integer from 1 to 8192")
    need("dropout", lambda value: isinstance(value, (int, float)) and 0 <= value < 1, "a probability in [0, 1)")
    need("optimizer", lambda value: value in OPTIMIZERS, f"one of {', '.join(OPTIMIZERS)}")
    need(
        "lr",
        lambda value: isinstance(value, (int, float)) and 0 < value < 10 and math.isfinite(value),
        "a positive learning rate",
    )
    need("batch_size", lambda value: integer(value) and 1 <= value <= 65536, "a positive integer")
    need("weight_decay", lambda value: isinstance(value, (int, float)) and 0 <= value < 1, "in [0, 1)")
    need("growth", lambda value: isinstance(value, (int, float)) and 1 <= value <= 4, "a width factor from 1 to 4")
    need("residual", lambda value: isinstance(value, bool), "true or false")
    need("pool", lambda value: value in POOLS, f"one of {', '.join(POOLS)}")
    per = space["lr"].by_optimizer
    if per is not None:
        missing = [name for name in _values(space["optimizer"]) if name not in dict(per)]
        if missing:
            table.fail(
                f"lr gives a range per optimizer but none for {', '.join(missing)}: add "
                f"{missing[0]} = {{ low = ..., high = ..., log = true }} to lr, or drop it from optimizer"
            )


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


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"no TOML form for {value!r}")


def to_toml(cfg: StudyConfig) -> str:
    """Every setting the study runs with, defaults included, as a study file (`hpo create --explain`)."""
    raw = cfg.to_dict()
    lines = [f"{k} = {_toml_value(raw[k])}" for k in ("name", "description", "metric", "direction", "seed")]
    budget = {k: v for k, v in raw["budget"].items() if k != "time_s"}
    if cfg.budget.time_s is not None:
        budget["time"] = f"{cfg.budget.time_s:g}s"
    sections = {
        "budget": budget,
        "sampler": {"name": cfg.sampler.name, **cfg.sampler.options},
        "pruner": {"name": cfg.pruner.name, **cfg.pruner.options},
        "augment": raw["augment"],
        "train": raw["train"],
        "final": raw["final"],
        "checkpoints": raw["checkpoints"],
        "data": {k: v for k, v in raw["data"].items() if v not in ("", None, [])},
    }
    for title, table in sections.items():
        lines += ["", f"[{title}]"] + [f"{k} = {_toml_value(v)}" for k, v in table.items() if v is not None]
    warm = cfg.warm_start
    if warm.from_study is not None or warm.params:
        lines += ["", "[warm_start]"] + (
            [f"from = {_toml_value(warm.from_study)}", f"top = {warm.top}"] if warm.from_study is not None else []
        )
        for params in warm.params:
            lines += ["[[warm_start.params]]"] + [f"{k} = {_toml_value(v)}" for k, v in params.items()]
    lines += ["", "[space]"] + [f"{k} = {_toml_value(v)}" for k, v in raw["space"].items()]
    return "\n".join(lines) + "\n"
