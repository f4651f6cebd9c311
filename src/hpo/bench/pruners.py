"""`hpo bench --search T --pruners A,B`: pruners compared at equal time, on validation.

Each pruner runs the study's own search (`hpo optimize --time T`, no final model, no trial cap) in
a fresh storage of its own, once per seed. A seed's runs share the sampler seed, so their first trials are
the same configurations and the runs differ by what the pruner stopped. Runs are interleaved, seed
by seed, so that a slow spell of a shared machine falls on every pruner alike. The figure compared
is the study's best value at the final horizon, the one the finalizer would retrain, and beside it
the validation accuracy of the ensemble the finalizer's join rule keeps from the run (a pruner that
lets more distinct configurations complete gives it more to choose from); the test split is not read.

Every run trains one horizon: a study with `[budget] fit_epochs` is calibrated once, here, and the
horizon fitted to T is written into each run's study file (each run calibrating on its own would
fit its own horizon to the machine's speed at that moment, and the pruners would be compared at
different horizons). A pruner may be given with options, `successive_halving:min_resource=3`, so
that two settings of one pruner can be compared.
"""

from __future__ import annotations

import statistics
import time
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from hpo.bench.search import Setup, optimize_in
from hpo.errors import HpoError
from hpo.search.study import stored_config
from hpo.settings import config
from hpo.settings.components import PRUNERS, Component
from hpo.settings.config import StudyConfig
from hpo.settings.durations import format_duration
from hpo.settings.writer import to_toml


def horizon_options(name: str, cfg: StudyConfig) -> dict[str, Any]:
    """`name`'s options: the study file's own where it names that pruner, else settings suited to its
    horizon of `[budget] epochs`: halving's as cnn-quick.toml sets them; median's prune from the first
    COMPLETE trial on, as cnn.toml did until 2026-12-07 (it now waits for 3, which a 10-minute CPU
    search never completes: docs/performance.md, "Pruning at the final horizon")."""
    if name == cfg.pruner.name:
        return dict(cfg.pruner.options)
    warmup = min(2, cfg.budget.epochs - 1)  # spare the learning-rate warm-up and the first cosine epoch
    defaults: dict[str, dict[str, Any]] = {
        "median": {"n_startup_trials": 1, "n_warmup_steps": warmup, "n_min_trials": 1},
        "percentile": {"percentile": 25.0, "n_startup_trials": 1, "n_warmup_steps": warmup, "n_min_trials": 1},
        "successive_halving": {"min_resource": 1, "reduction_factor": 3},
        "hyperband": {"min_resource": 1, "max_resource": cfg.budget.epochs, "reduction_factor": 3},
        "none": {},
    }
    return defaults[name]


UNCAPPED_TRIALS = 100_000  # [budget] n_trials of every run: the clock, not the count, ends each search


@dataclass(frozen=True)
class Arm:
    """One pruner of the comparison: its label as given (`median`, or `successive_halving:min_resource=3`),
    the pruner's name, and the options given beside the name (over horizon_options)."""

    label: str
    name: str
    given: dict[str, Any]

    def options(self, cfg: StudyConfig) -> dict[str, Any]:
        return {**horizon_options(self.name, cfg), **self.given}


def variant(cfg: StudyConfig, arm: Arm | str, seed_index: int) -> StudyConfig:
    """The study with `arm`'s pruner and the seed_index-th seed, under a name of its own, with no trial
    cap (a pruner that stops trials sooner must get to spend the time it saves)."""
    arm = arm if isinstance(arm, Arm) else Arm(arm, arm, {})
    slug = "".join(c if c.isalnum() else "-" for c in arm.label)
    return replace(
        cfg,
        name=f"{cfg.name}-{slug}-{seed_index + 1}",
        seed=cfg.seed + seed_index,
        budget=replace(cfg.budget, n_trials=max(cfg.budget.n_trials, UNCAPPED_TRIALS)),
        pruner=Component(arm.name, arm.options(cfg)),
    )


EXAMPLE = "e.g. --pruners median,successive_halving or successive_halving,successive_halving:min_resource=3"


def parse_pruners(text: str) -> list[Arm]:
    """'median,successive_halving:min_resource=3' -> its arms, each pruner known and each arm given once."""
    labels = [n.strip() for n in text.split(",") if n.strip()]
    arms = [_arm(text, label) for label in labels]
    if len(arms) < 2 or len({(a.name, tuple(sorted(a.given.items()))) for a in arms}) != len(arms):
        raise HpoError(
            f"--pruners {text!r}: it needs at least two different pruners. Give two or more of "
            f"{', '.join(PRUNERS)}, comma-separated, with options after a colon if you like; {EXAMPLE}."
        )
    return arms


def _arm(text: str, label: str) -> Arm:
    """One comma-separated item: a pruner's name, then `:key=value` options."""
    name, *pairs = [part.strip() for part in label.split(":")]
    if name not in PRUNERS:
        raise HpoError(
            f"--pruners {text!r}: {name!r} is not a pruner. Give two or more of {', '.join(PRUNERS)}, "
            f"comma-separated; {EXAMPLE}."
        )
    given: dict[str, Any] = {}
    for pair in pairs:
        key, eq, raw = pair.partition("=")
        if not eq or not key.strip() or not raw.strip():
            raise HpoError(
                f"--pruners {text!r}: {pair!r} is not key=value. Write options as {name}:key=value; {EXAMPLE}."
            )
        try:  # a TOML value, as a study file would give it: 3, 0.5, true, "auto"
            given[key.strip()] = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            given[key.strip()] = raw.strip()
    return Arm(label.replace(" ", ""), name, given)


def check_arms(cfg: StudyConfig, arms: list[Arm]) -> None:
    """Each arm's study file as it will be written, read back with its pruner's options checked against
    Optuna's own constructor, so that a bad option stops the benchmark before its first run."""
    for arm in arms:
        try:
            config.parse(tomllib.loads(to_toml(variant(cfg, arm, 0))))
        except HpoError as e:
            raise HpoError(f"--pruners: {arm.label!r}: {e}") from None


def shared_horizon(setup: Setup, cfg: StudyConfig) -> tuple[StudyConfig, float | None]:
    """The study as every run trains it, and the calibrated seconds of a trial epoch behind it: with
    `[budget] fit_epochs`, the horizon fitted to `setup.time_s` from one calibration on this machine
    (as `hpo optimize` would fit it), then fixed; without it, the file's horizon."""
    if not cfg.budget.fit_epochs:
        return cfg, None
    from hpo.learn import sources
    from hpo.learn.devices import finalizer_threads, threads_per_worker
    from hpo.search import horizon
    from hpo.search.objective import calibrate_here

    threads = threads_per_worker(setup.workers)  # as `hpo optimize --workers` gives each worker
    cost = calibrate_here(cfg, sources.open_for(cfg, str(setup.data_dir)), setup.device, threads)
    on_gpu = (setup.device or "").startswith("cuda")
    fitted = horizon.fit_horizon(cfg, cost, finalizer_threads(on_gpu, threads), setup.time_s, setup.workers, True)
    if fitted is None:
        raise HpoError(
            f"--search {format_duration(setup.time_s)} does not hold one epoch of study {cfg.name!r} plus its "
            f"finalizer here ({cost.epoch_s:.1f}s per trial epoch, calibrated on this machine). Give a longer --search."
        )
    return replace(fitted, budget=replace(fitted.budget, fit_epochs=False, max_epochs=None)), cost.epoch_s


def record(study: Any, pruner: str, seed: int, wall_s: float) -> dict[str, Any]:
    """One run's figures from its finished study."""
    trials = study.get_trials(deepcopy=False)
    states = [t.state.name for t in trials]
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    best = study.best_trial if complete else None
    stored = stored_config(study)
    assert stored is not None, "hpo optimize records the settings when it creates the study"
    return {
        "pruner": pruner,
        "seed": seed,
        "horizon": stored.budget.epochs,  # [budget] fit_epochs may have fitted it to the time on this machine
        "best_value": best.value if best else None,
        "best_trial": best.number if best else None,
        "trials": len(trials),
        "complete": states.count("COMPLETE"),
        "pruned": states.count("PRUNED"),
        "failed": states.count("FAIL"),
        "epochs": sum(len(t.intermediate_values) for t in trials),
        "wall_time_s": round(wall_s, 1),
    }


def summarize(runs: list[dict[str, Any]], pruners: list[str], direction: str) -> list[dict[str, Any]]:
    """Per pruner: its best values over the seeds and the join rule's ensembles, their means, and the
    mean paired difference of each from the first pruner's run on the same seed (positive: better,
    in the study's direction; an ensemble's accuracy is always better higher)."""
    sign = 1.0 if direction == "maximize" else -1.0
    by_seed = {(r["pruner"], r["seed"]): r for r in runs}
    first = pruners[0]
    rows = []
    for name in pruners:
        own = [r for r in runs if r["pruner"] == name]
        values = [r["best_value"] for r in own if r["best_value"] is not None]
        ensembles = [r["ensemble_value"] for r in own if r.get("ensemble_value") is not None]
        rows.append(
            {
                "pruner": name,
                "best_values": values,
                "mean_best": statistics.fmean(values) if values else None,
                "ensemble_values": ensembles,
                "mean_ensemble": statistics.fmean(ensembles) if ensembles else None,
                "runs_without_a_complete_trial": len(own) - len(values),
                "mean_trials": statistics.fmean(r["trials"] for r in own),
                "mean_complete": statistics.fmean(r["complete"] for r in own),
                "mean_epochs": statistics.fmean(r["epochs"] for r in own),
                "vs_first": None if name == first else _paired(own, by_seed, first, "best_value", sign),
                "ensemble_vs_first": None if name == first else _paired(own, by_seed, first, "ensemble_value", 1.0),
            }
        )
    return rows


def _paired(own: list[dict[str, Any]], by_seed: dict[Any, dict[str, Any]], first: str, key: str, sign: float) -> Any:
    """The mean of `key`'s differences from the first pruner's run on the same seed (None: no pair)."""
    gaps = [
        sign * (r[key] - theirs)
        for r in own
        if r.get(key) is not None and (theirs := by_seed.get((first, r["seed"]), {}).get(key)) is not None
    ]
    return statistics.fmean(gaps) if gaps else None


def joined(study: Any, setup: Setup, where: Path) -> dict[str, Any]:
    """The ensemble the finalizer's join rule (hpo.search.join) would keep from a finished run: its
    members and their averaged validation accuracy. The finalizer trains those members, so a pruner
    that lets more distinct configurations complete can raise this where the best value cannot."""
    import optuna

    from hpo.learn import sources
    from hpo.search import artifacts, join

    if not study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        return {"members": [], "ensemble_value": None}
    stored = stored_config(study)
    assert stored is not None, "hpo optimize records the settings when it creates the study"
    val = join.val_labels(sources.open_for(stored, setup.data_dir, with_test=False).train.labels, stored)
    store = artifacts.open_store(artifacts.resolve_location(None, f"sqlite:///{where / 'runs' / 'hpo.db'}"))
    members, _ = join.choose_members(study, stored, val, store)
    return {"members": [t.number for t in members], "ensemble_value": join.ensemble_accuracy(members, val, store)}


def compare(setup: Setup, arms: list[Arm], seeds: int) -> dict[str, Any]:
    """Run the study's search for `setup.time_s` once per pruner and seed (interleaved), at one shared
    horizon, and compare."""
    cfg = config.load(setup.study_file)
    check_arms(cfg, arms)
    cfg, calibration_s = shared_horizon(setup, cfg)
    setup.work_dir.mkdir(parents=True, exist_ok=True)
    runs = []
    for seed_index in range(seeds):
        for arm in arms:
            study_cfg = variant(cfg, arm, seed_index)
            where = setup.work_dir / study_cfg.name
            where.mkdir(parents=True, exist_ok=True)
            path = where / f"{study_cfg.name}.toml"
            path.write_text(to_toml(study_cfg))
            started = time.perf_counter()
            study = optimize_in(replace(setup, study_file=path, work_dir=where), final=False)
            wall_s = time.perf_counter() - started
            runs.append({**record(study, arm.label, study_cfg.seed, wall_s), **joined(study, setup, where)})
    return {
        "study": cfg.name,
        "time_s": setup.time_s,
        "workers": setup.workers,
        "metric": cfg.metric,
        "direction": cfg.direction,
        "horizon": cfg.budget.epochs,
        "calibration_s": calibration_s,
        "options": {arm.label: arm.options(cfg) for arm in arms},
        "runs": runs,
        "pruners": summarize(runs, [arm.label for arm in arms], cfg.direction),
    }
