"""The study commands: create, worker, optimize, final-train, studies, extend, delete, best, status, dashboard."""

from __future__ import annotations

import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

import click

from hpo.cli.group import (
    artifacts_option,
    cli,
    data_option,
    device_option,
    log,
    parse_time,
    started_at,
    storage_option,
    study_option,
)
from hpo.errors import HpoError
from hpo.paths import final_dir
from hpo.results import report
from hpo.search import session
from hpo.search.storage import mask
from hpo.settings import config
from hpo.settings.writer import to_toml


@cli.command()
@study_option
@storage_option
@click.option("--explain", is_flag=True, help="Also print every setting the study runs with, defaults included.")
def create(study_arg: str, storage: str | None, explain: bool) -> None:
    """Create the tables and the study if missing (safe to repeat), then exit."""
    from hpo.search.study import create_or_load

    cfg = config.load(study_arg)
    opened = session.open_storage(storage)
    study, cfg = create_or_load(opened.storage, cfg)
    click.echo(
        f"study {cfg.name!r} is ready in {mask(opened.url)} with {len(study.trials)} trials so far "
        f"(budget {cfg.budget.n_trials})"
    )
    if explain:
        click.echo(f"# the settings stored in study {cfg.name!r}, as a study file\n{to_toml(cfg)}", nl=False)


@cli.command()
@study_option
@storage_option
@data_option
@device_option
@artifacts_option
@click.option("--threads", type=int, envvar="HPO_THREADS", help="CPU threads for this worker [default: all cores].")
@click.option(
    "--sampler-seed",
    type=int,
    envvar="HPO_SAMPLER_SEED",
    help="Seed this worker's sampler (distinct per worker) [default: random].",
)
@click.option(
    "--trials-per-gpu",
    type=int,
    envvar="HPO_TRIALS_PER_GPU",
    help="Workers (so trials) that may share one GPU; a worker waits for a free slot [default: 1].",
)
def worker(
    study_arg: str,
    storage: str | None,
    data_dir: str | None,
    device: str | None,
    artifacts: str | None,
    threads: int | None,
    sampler_seed: int | None,
    trials_per_gpu: int | None,
) -> None:
    """Run trials of a shared study until its budget is met."""
    from hpo.search.interrupts import Shutdown
    from hpo.search.worker import Request, start

    request = Request(study_arg, storage, data_dir, device, artifacts, threads, sampler_seed, trials_per_gpu)
    try:
        result = start(request)
    except Shutdown as e:
        log.warning("stopping: %s; a running trial was failed and re-queued", e)
        sys.exit(128 + e.signal)
    log.info("worker done after %d trials: %s", result.trials_run, result.reason)


@cli.command()
@study_option
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True, help="Local worker processes.")
@click.option(
    "--time",
    "time_budget",
    metavar="DURATION",
    help="Wall-clock budget of search plus finalizer, e.g. 10m or 1h30m; starts now and overrides the "
    "file's [budget] time. No trial starts that its estimate says cannot end in time.",
)
@click.option(
    "--final",
    "run_final",
    is_flag=True,
    help="Run the finalizer (final-train) when the search ends, inside the same time budget.",
)
@storage_option
@data_option
@device_option
@artifacts_option
def optimize(
    study_arg: str,
    workers: int,
    time_budget: str | None,
    run_final: bool,
    storage: str | None,
    data_dir: str | None,
    device: str | None,
    artifacts: str | None,
) -> None:
    """Start N local workers on one study (embedded storage by default) and wait for them.

    On a terminal it shows a progress bar and sends the workers' logs to runs/STUDY/logs/; in a
    pipe or a CI log the workers' log lines come through as they are.
    """
    from hpo import launch

    time_s = parse_time(time_budget) if time_budget else None
    request = launch.Request(study_arg, workers, time_s, run_final, storage, data_dir, device, artifacts, started_at())
    launch.optimize(request, click.echo)


@cli.command("final-train")
@study_option
@storage_option
@data_option
@device_option
@artifacts_option
@click.option("--out", type=click.Path(file_okay=False), help="Output directory [default: runs/STUDY/final].")
@click.option("--epochs", type=click.IntRange(min=1), help="Override the study file's final epochs.")
def final_train(
    study_arg: str,
    storage: str | None,
    data_dir: str | None,
    device: str | None,
    artifacts: str | None,
    out: str | None,
    epochs: int | None,
) -> None:
    """Retrain the best trial(s) on train + validation and score the test split once."""
    from hpo.learn import sources
    from hpo.learn.devices import place
    from hpo.results import final
    from hpo.search import budget

    opened = session.open_study(study_arg, storage)
    study, cfg = opened.study, opened.config
    store = opened.artifact_store(artifacts)[1]
    workspace = session.Workspace(opened.storage, store, place(device), sources.open_for(cfg, data_dir))
    out_dir = Path(out) if out else final_dir(cfg.name)
    metrics = final.final_train(study, cfg, workspace, out_dir, epochs, budget.running_deadline(study))
    click.echo(report.final_text(metrics, out_dir, cfg.name))


@cli.command()
@storage_option
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON (schema hpo-studies/1).")
def studies(storage: str | None, as_json: bool) -> None:
    """Every study in the storage: direction, finished/budget, best value, final test accuracy, running."""
    from hpo.search.status import listing

    found = listing(session.open_storage(storage).storage)
    if as_json:
        click.echo(json.dumps(found, indent=2))
        return
    if not found["studies"]:
        click.echo("no studies in this storage yet; `hpo optimize --study NAME` creates one")
        return
    click.echo(report.studies_text(found["studies"]))


@cli.command()
@study_option
@storage_option
@click.option("--trials", "n_trials", type=int, help="The new trial budget (more than the trials finished so far).")
@click.option("--time", "time_budget", metavar="DURATION", help="A new time budget from now, e.g. 30m.")
def extend(study_arg: str, storage: str | None, n_trials: int | None, time_budget: str | None) -> None:
    """Raise a study's budget; running and restarted workers go on to it."""
    import hpo.search.study

    if n_trials is None and time_budget is None:
        raise click.UsageError("give --trials N, --time DURATION or both")
    time_s = None if time_budget is None else parse_time(time_budget)
    opened = session.open_study(study_arg, storage)
    cfg = opened.config
    new = hpo.search.study.extend(opened.study, cfg, n_trials, time_s)
    click.echo(
        f"study {cfg.name!r}: budget {new.budget.n_trials} trials (was {cfg.budget.n_trials})"
        + (f", time budget {time_budget} from now" if time_s else "")
        + "; start workers (`hpo optimize` or `hpo worker`) if none is running"
    )


@cli.command()
@study_option
@storage_option
@artifacts_option
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--force", is_flag=True, help="Delete even while workers are running trials.")
def delete(study_arg: str, storage: str | None, artifacts: str | None, yes: bool, force: bool) -> None:
    """Delete a study, its trials and its artifacts (files in runs/ stay)."""
    import hpo.search.study

    opened = session.open_study(study_arg, storage)
    study, cfg = opened.study, opened.config
    if not force:
        hpo.search.study.refuse_while_live(study, opened.storage)
    if not yes:
        _confirm(
            f"deleting study {cfg.name!r}",
            f"Delete study {cfg.name!r} with its {len(study.trials)} trials and their artifacts?",
        )
    n_trials = len(study.get_trials(deepcopy=False))
    removed = hpo.search.study.delete(study, opened.storage, opened.artifact_store(artifacts)[1])
    click.echo(f"deleted study {cfg.name!r}: {n_trials} trials and {removed} artifact file(s)")


def _confirm(what: str, question: str) -> None:
    """Ask on the terminal (no: abort); without a terminal to ask on, refuse in one line."""
    if not sys.stdin.isatty():
        raise HpoError(f"{what} needs a confirmation and there is no terminal to ask on. Pass --yes.")
    click.confirm(question, abort=True)


@cli.command()
@study_option
@storage_option
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON (schema hpo-best/1).")
def best(study_arg: str, storage: str | None, as_json: bool) -> None:
    """The best trial: its number, validation value and parameters."""
    from hpo.search.status import best_of

    opened = session.open_study(study_arg, storage)
    found = best_of(opened.study, opened.config)
    if as_json:
        click.echo(json.dumps(found, indent=2))
        return
    click.echo(report.best_text(found))


@cli.command()
@study_option
@storage_option
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON (schema hpo-status/1).")
@click.option("--watch", is_flag=True, help="Refresh until the budget is met and nothing runs (Ctrl-C stops).")
@click.option(
    "--interval",
    type=click.FloatRange(min=0.2),
    default=2.0,
    show_default=True,
    help="Seconds between refreshes with --watch.",
)
def status(study_arg: str, storage: str | None, as_json: bool, watch: bool, interval: float) -> None:
    """Trials by state, the best trial, pruning savings, running trials and an ETA."""
    from hpo.search.status import search_over, study_status

    opened = session.open_study(study_arg, storage)
    for refresh in itertools.count():
        summary = study_status(opened.study, opened.config, opened.storage)
        _show_status(summary, as_json, watch, again=refresh > 0)
        if not watch or (search_over(summary) and not summary["running"]):
            return
        try:
            time.sleep(interval)
        except KeyboardInterrupt:
            return


def _show_status(summary: dict[str, Any], as_json: bool, watch: bool, again: bool) -> None:
    """One refresh: JSON (one line per refresh with --watch), or the table; on a terminal --watch
    redraws the screen, elsewhere a blank line separates the refreshes."""
    if as_json:
        click.echo(json.dumps(summary, indent=None if watch else 2))
        return
    if watch and sys.stdout.isatty():
        click.clear()
    elif again:
        click.echo("")
    click.echo(report.status_text(summary))


@cli.command()
@click.option(
    "--study",
    "study_arg",
    metavar="NAME|PATH",
    envvar="HPO_STUDY",
    help="Open this study's page [env HPO_STUDY; default: the study list].",
)
@storage_option
@artifacts_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (no authentication!).")
@click.option("--port", default=8080, show_default=True, type=int)
def dashboard(study_arg: str | None, storage: str | None, artifacts: str | None, host: str, port: int) -> None:
    """Serve optuna-dashboard on the storage and artifact store the workers use."""
    from optuna_dashboard import run_server

    from hpo.search import optuna_compat

    opened = session.open_study(study_arg, storage) if study_arg else session.open_storage(storage)
    study = opened.study if isinstance(opened, session.OpenedStudy) else None
    page = f"dashboard/studies/{optuna_compat.study_id(study)}" if study else "dashboard"
    location, artifact_store = opened.artifact_store(artifacts)
    click.echo(
        f"optuna-dashboard on {mask(opened.url)}, artifacts in {location}: "
        f"http://{host}:{port}/{page}  (Ctrl-C to stop)"
    )
    run_server(opened.storage, host=host, port=port, artifact_store=artifact_store)
