"""`hpo bench --search T --pruners A,B`: pruners compared at equal time, on validation.

Each pruner runs the study's own search (`hpo optimize --time T`, no final model, no trial cap) in
a fresh storage of its own, once per seed. A seed's runs share the sampler seed, so their first trials are
the same configurations and the runs differ by what the pruner stopped. Runs are interleaved, seed
by seed, so that a slow spell of a shared machine falls on every pruner alike. The figure compared
is the study's best value at the final horizon, the one the finalizer would retrain; the test
split is not read.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace
from typing import Any

from hpo.bench.search import Setup, optimize_in
from hpo.errors import HpoError
from hpo.search.study import stored_config
from hpo.settings import config
from hpo.settings.components import PRUNERS, Component
from hpo.settings.config import StudyConfig
from hpo.settings.writer import to_toml


def horizon_options(name: str, cfg: StudyConfig) -> dict[str, Any]:
    """`name`'s options: the study file's own where it names that pruner, else settings suited to its
    horizon of `[budget] epochs`, as the shipped studies set them (studies/cnn.toml, cnn-quick.toml)."""
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


def variant(cfg: StudyConfig, pruner: str, seed_index: int) -> StudyConfig:
    """The study with `pruner` and the seed_index-th seed, under a name of its own, with no trial cap
    (a pruner that stops trials sooner must get to spend the time it saves)."""
    return replace(
        cfg,
        name=f"{cfg.name}-{pruner.replace('_', '-')}-{seed_index + 1}",
        seed=cfg.seed + seed_index,
        budget=replace(cfg.budget, n_trials=max(cfg.budget.n_trials, UNCAPPED_TRIALS)),
        pruner=Component(pruner, horizon_options(pruner, cfg)),
    )


def parse_pruners(text: str) -> list[str]:
    """'median,successive_halving' -> its names, each known and named once."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in PRUNERS]
    if unknown or len(names) < 2 or len(set(names)) != len(names):
        problem = (
            f"{', '.join(map(repr, unknown))} is not a pruner" if unknown else "it needs at least two different pruners"
        )
        raise HpoError(
            f"--pruners {text!r}: {problem}. Give two or more of {', '.join(PRUNERS)}, comma-separated, "
            "e.g. --pruners median,successive_halving."
        )
    return names


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
    """Per pruner: its best values over the seeds, their mean, and the mean paired difference from
    the first pruner's run on the same seed (positive: better, in the study's direction)."""
    sign = 1.0 if direction == "maximize" else -1.0
    by_seed = {(r["pruner"], r["seed"]): r for r in runs}
    first = pruners[0]
    rows = []
    for name in pruners:
        own = [r for r in runs if r["pruner"] == name]
        values = [r["best_value"] for r in own if r["best_value"] is not None]
        gaps = [
            sign * (r["best_value"] - by_seed[(first, r["seed"])]["best_value"])
            for r in own
            if r["best_value"] is not None and by_seed.get((first, r["seed"]), {}).get("best_value") is not None
        ]
        rows.append(
            {
                "pruner": name,
                "best_values": values,
                "mean_best": statistics.fmean(values) if values else None,
                "runs_without_a_complete_trial": len(own) - len(values),
                "mean_trials": statistics.fmean(r["trials"] for r in own),
                "mean_complete": statistics.fmean(r["complete"] for r in own),
                "mean_epochs": statistics.fmean(r["epochs"] for r in own),
                "vs_first": statistics.fmean(gaps) if gaps and name != first else None,
            }
        )
    return rows


def compare(setup: Setup, pruners: list[str], seeds: int) -> dict[str, Any]:
    """Run the study's search for `setup.time_s` once per pruner and seed (interleaved), and compare."""
    cfg = config.load(setup.study_file)
    setup.work_dir.mkdir(parents=True, exist_ok=True)
    runs = []
    for seed_index in range(seeds):
        for pruner in pruners:
            study_cfg = variant(cfg, pruner, seed_index)
            where = setup.work_dir / study_cfg.name
            where.mkdir(parents=True, exist_ok=True)
            path = where / f"{study_cfg.name}.toml"
            path.write_text(to_toml(study_cfg))
            started = time.perf_counter()
            study = optimize_in(replace(setup, study_file=path, work_dir=where), final=False)
            runs.append(record(study, pruner, study_cfg.seed, time.perf_counter() - started))
    return {
        "study": cfg.name,
        "time_s": setup.time_s,
        "workers": setup.workers,
        "metric": cfg.metric,
        "direction": cfg.direction,
        "options": {p: horizon_options(p, cfg) for p in pruners},
        "runs": runs,
        "pruners": summarize(runs, pruners, cfg.direction),
    }
