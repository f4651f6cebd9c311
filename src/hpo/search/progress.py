"""Progress for people: a bar with an ETA on a terminal, plain log lines in a pipe or a CI log; and
a study's progress on that bar, as `hpo optimize` shows it."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, TextIO

import optuna
from optuna.trial import TrialState
from tqdm import tqdm

from hpo.search.status import study_status
from hpo.search.trials import FINISHED
from hpo.settings.config import StudyConfig
from hpo.settings.durations import format_duration

log = logging.getLogger("hpo")


def interactive(stream: TextIO | None = None) -> bool:
    """A terminal a person watches; HPO_PROGRESS=bar|log overrides the guess."""
    forced = os.environ.get("HPO_PROGRESS", "").lower()
    if forced in ("bar", "log"):
        return forced == "bar"
    stream = stream or sys.stderr
    return stream.isatty() and os.environ.get("TERM") != "dumb" and not os.environ.get("CI")


def _columns() -> int:
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns
    except (OSError, ValueError):
        return 0


class Progress:
    """Counts `total` units (epochs or trials). `advance` moves it on and shows the figures given."""

    def __init__(self, total: int, desc: str, unit: str, initial: int = 0):
        self.total, self.desc, self.unit = total, desc, unit
        self.bar = None
        if interactive():
            # A terminal that reports no size (a bare pty, `script`) would get a zero-width bar: draw 100 columns.
            sized = _columns() > 0
            self.bar = tqdm(
                total=total,
                initial=initial,
                desc=desc,
                unit=unit,
                file=sys.stderr,
                dynamic_ncols=sized,
                ncols=None if sized else 100,
                nrows=None if sized else 24,
                bar_format="{desc}: {n_fmt}/{total_fmt} {unit} |{bar}| {elapsed}<{remaining}{postfix}",
            )

    def advance(self, n: int = 1, line: str = "", **figures: Any) -> None:
        """`figures` go beside the bar; in log mode, `line` (or the figures) becomes one log line."""
        if self.bar is not None:
            self.bar.set_postfix(figures, refresh=False)
            self.bar.update(n)
        elif n or line:
            log.info("%s %s", self.desc, line or "  ".join(f"{k} {v}" for k, v in figures.items()))

    def resize(self, total: int) -> None:
        """A new total (the finalizer re-fits its epochs to the time left as it trains)."""
        self.total = total
        if self.bar is not None:
            self.bar.total = total
            self.bar.refresh()

    def set(self, done: int, **figures: Any) -> None:
        """Jump to `done` units (for counts read from the database)."""
        if self.bar is not None:
            self.bar.set_postfix(figures, refresh=False)
            self.bar.update(done - self.bar.n)

    def write(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            log.info("%s", message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *_exc: Any) -> None:
        self.close()


def show_study(bar: Progress, study: optuna.Study, cfg: StudyConfig, storage: Any, reported: set[int]) -> None:
    """Announce each newly finished trial and move the bar to `hpo status`'s figures."""
    try:
        trials = study.get_trials(deepcopy=False)
        summary = study_status(study, cfg, storage)
    except Exception:  # a database blip: the workers ride it out, the bar waits for the next poll
        return
    for trial in sorted((trial for trial in trials if trial.state in FINISHED), key=lambda trial: trial.number):
        if trial.number not in reported:
            reported.add(trial.number)
            last = max(trial.intermediate_values) if trial.intermediate_values else 0
            value = trial.value if trial.state == TrialState.COMPLETE else trial.intermediate_values.get(last)
            bar.write(
                f"trial {trial.number} {trial.state.name.lower()} at epoch {last}: {value:.4f}"
                if value is not None
                else f"trial {trial.number} {trial.state.name.lower()}"
            )
    best = summary["best"]
    figures = {
        "best": "-" if best is None else f"{best['value']:.4f}",
        "pruned": summary["states"]["PRUNED"],
        "running": len(summary["running"]),
    }
    clock = summary["time_budget"]
    if clock is None:
        bar.set(summary["finished"], **figures)
        return
    left = clock["left_s"]
    bar.set(round(clock["time_s"] - left), left=format_duration(left), trials=summary["started"], **figures)
