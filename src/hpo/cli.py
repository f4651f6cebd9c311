"""`hpo` commands: each parses its options, calls one library function and prints the result.

Errors a user can cause are `HpoError`s; they print as one line and exit 1 (`--debug` re-raises).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import click

from hpo import config, session
from hpo import storage as storage_mod
from hpo.errors import HpoError

log = logging.getLogger("hpo")


class HpoGroup(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except HpoError as e:
            if (ctx.obj or {}).get("debug"):
                raise
            raise click.ClickException(str(e)) from e
        except click.BadParameter as e:
            # A bad HPO_* variable is not a typo on the command line: name the variable, in one line.
            source = e.ctx.get_parameter_source(e.param.name) if e.ctx and e.param and e.param.name else None
            envvar = e.param.envvar if e.param is not None else None
            if source == click.core.ParameterSource.ENVIRONMENT and isinstance(envvar, str):
                raise click.ClickException(
                    f"{envvar}={os.environ.get(envvar, '')!r}: {e.message} Fix it, or unset it."
                ) from e
            raise


def _setup_logging(verbose: bool) -> None:
    import optuna

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s[%(process)d] %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    # Route Optuna's messages through the same handler instead of its own coloured one.
    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    if not verbose:  # boto3 logs where it found each setting at INFO, on every S3 client it makes
        for name in ("botocore", "boto3", "urllib3"):
            logging.getLogger(name).setLevel(logging.WARNING)


@click.group(cls=HpoGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
@click.version_option(package_name="hpo-service")
@click.pass_context
def cli(ctx: click.Context, debug: bool, verbose: bool) -> None:
    """Hyperparameter search for a DynamicCNN on Fashion-MNIST, shared by many workers."""
    ctx.obj = {"debug": debug}
    _setup_logging(verbose)


study_option = click.option(
    "--study",
    "study_arg",
    required=True,
    metavar="NAME|PATH",
    envvar="HPO_STUDY",
    help="Study name (finds studies/NAME.toml) or a path to a study file [env HPO_STUDY].",
)
storage_option = click.option(
    "--storage",
    envvar="HPO_STORAGE",
    metavar="URL",
    help=f"Storage URL [env HPO_STORAGE; default {storage_mod.default_url()}].",
)
data_option = click.option(
    "--data-dir",
    envvar="HPO_DATA_DIR",
    type=click.Path(file_okay=False),
    help="This host's copy of the study's data: the directory [data] path names (for Fashion-MNIST, the one "
    "with its IDX files) [env HPO_DATA_DIR].",
)
artifacts_option = click.option(
    "--artifacts",
    envvar="HPO_ARTIFACTS",
    metavar="DIR|s3://BUCKET",
    help="Artifact store shared by workers, finalizer and dashboard [env HPO_ARTIFACTS; "
    "default: artifacts/ beside the SQLite file, else runs/artifacts].",
)


def count_option(flag: str, least: int, default: int, help: str) -> Any:
    """An integer option of at least `least`, its default shown in --help."""
    return click.option(flag, type=click.IntRange(min=least), default=default, show_default=True, help=help)


device_option = click.option("--device", envvar="HPO_DEVICE", help="cpu, cuda or cuda:N [default: cuda if present].")


@cli.command()
@study_option
@storage_option
@click.option("--explain", is_flag=True, help="Also print every setting the study runs with, defaults included.")
def create(study_arg: str, storage: str | None, explain: bool) -> None:
    """Create the tables and the study if missing (safe to repeat), then exit."""
    from hpo import study as study_mod

    cfg = config.load(study_arg)
    opened = session.open_storage(storage)
    study, cfg = study_mod.create_or_load(opened.storage, cfg)
    click.echo(
        f"study {cfg.name!r} is ready in {storage_mod.mask(opened.url)} with {len(study.trials)} trials so far "
        f"(budget {cfg.budget.n_trials})"
    )
    if explain:
        click.echo(f"# the settings stored in study {cfg.name!r}, as a study file\n{config.to_toml(cfg)}", nl=False)


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
    from hpo import artifacts as artifacts_mod
    from hpo import worker as worker_mod
    from hpo.devices import trials_per_gpu as slots_per_gpu

    slots = slots_per_gpu(trials_per_gpu)
    # The artifact store is checked first: a bad location must fail before the storage is touched.
    _, artifact_store = artifacts_mod.open_for(artifacts, storage_mod.resolve_url(storage))
    cfg, opened = session.worker_config(study_arg, storage)
    try:
        result = worker_mod.serve(cfg, opened, artifact_store, data_dir, device, threads, sampler_seed, slots)
    except worker_mod.Shutdown as e:
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
    from hpo import budget, final, launch, sources
    from hpo import study as study_mod
    from hpo.devices import threads_per_worker

    started_at = _PROCESS_STARTED_AT or time.time()  # the clock covers this process's start-up too
    cfg = config.load(study_arg)
    time_s = _parse_time(time_budget) if time_budget else cfg.budget.time_s
    dataset = sources.open_for(cfg, data_dir)  # bad data stops here, before anything is stored
    opened = session.open_storage(storage)
    location, artifact_store = opened.artifact_store(artifacts)  # fail here, not in every worker
    threads = threads_per_worker(workers)
    study, cfg = launch.prepare(
        cfg, opened, time_s, time_budget is not None, dataset, device, threads, started_at, workers
    )
    dataset = sources.for_study(dataset, cfg, data_dir)  # the study's stored [data] win over the file's
    log.info(
        f"study {cfg.name!r}: {workers} workers x {threads} thread(s), storage {storage_mod.mask(opened.url)}, "
        f"artifacts {location}{_time_note(budget.get_deadline(study))}"
    )
    if (line := launch.outlook(study, cfg, workers, threads, device)) is not None:
        log.info(line)
    args = launch.worker_args(study_arg, opened.url, Path(dataset.origin), location, device)
    finished_before = study_mod.finished_count(study)
    try:
        launch.run_workers(study, cfg, opened.storage, workers, threads, args)
    finally:
        click.echo(_format_status(study_mod.summary(study, cfg, opened.storage)))
    if run_final:
        metrics = final.after_search(study, cfg, opened.storage, dataset, device, artifact_store, finished_before)
        _echo_final(metrics, storage_mod.final_dir(cfg.name), cfg.name)
    click.echo(f"wall time {time.time() - started_at:.0f}s")


def _time_note(deadline: Any) -> str:
    if deadline is None:
        return ""
    return f", time budget {config.format_duration(deadline.time_s)} ({config.format_duration(deadline.left())} left)"


def _parse_time(text: str) -> float:
    try:
        return config.parse_duration(text)
    except ValueError as e:
        raise HpoError(f"--time: {e}.") from e


def _echo_final(metrics: dict[str, Any], out_dir: Path, name: str) -> None:
    from hpo.final import describe_accuracy

    ens = metrics["ensemble"]
    what = "one model" if ens["models"] == 1 else f"ensemble of {ens['models']}"
    tta = ", flip TTA" if ens["tta"] == "flip" else ""
    click.echo(
        f"test accuracy {describe_accuracy(metrics['test_accuracy'], metrics['test_ci95'])}, {what}{tta}  "
        f"(loss {metrics['test_loss']:.4f}, {metrics['test_images']} test images, {metrics['epochs']} epochs, "
        f"{metrics['wall_time_s']:.0f}s)"
    )
    for member in metrics["members"]:
        click.echo(
            f"  member trial {member['trial']} (val {member['value']:.4f}, seed {member['seed']}): "
            f"{describe_accuracy(member['test_accuracy'], member['ci95'])}, "
            + (
                f"trained in {member['train_time_s']:.0f}s"
                if member["trained_by"] == "final-train"
                else "its trial's own model, trained by the search"
            )
        )
    if ens["models"] > 1:
        click.echo(f"  gain of the ensemble over its best member: {100 * ens['gain_over_best_member']:+.2f} points")
    if ens["shrunk"]:
        click.echo(f"  {ens['shrunk']}")
    click.echo(
        f"wrote model.pt, metrics.json, confusion_matrix.png, learning_curve.png and misclassified.png "
        f"to {out_dir}, and uploaded them to study {name!r} in the artifact store"
    )


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
    from hpo import budget, final, sources
    from hpo.devices import place

    opened = session.open_study(study_arg, storage)
    study, cfg = opened.study, opened.config
    _, artifact_store = opened.artifact_store(artifacts)
    placement = place(device)
    dataset = sources.open_for(cfg, data_dir)
    out_dir = Path(out) if out else storage_mod.final_dir(cfg.name)
    deadline = budget.get_deadline(study)
    # Inside a running job's budget the ensemble shrinks to fit; once the job's time is over, a
    # final-train asked for by hand trains the whole ensemble.
    live = deadline if deadline is not None and deadline.left() > 0 else None
    metrics = final.final_train(study, cfg, dataset, placement, out_dir, epochs, artifact_store, opened.storage, live)
    _echo_final(metrics, out_dir, cfg.name)


def _status_tail(summary: dict[str, Any]) -> list[str]:
    """The ETA, the time budget and the final result, when the study has them."""
    lines: list[str] = []
    clock = summary.get("time_budget")
    timed_out = clock is not None and clock["left_s"] == 0
    if summary["remaining"] and not timed_out:
        how = (
            f"{len(summary['running'])} worker(s) at {config.format_duration(summary['mean_trial_s'])} per trial"
            if summary["running"]
            else "no worker is running"
        )
        if clock and summary["eta_s"] is not None and summary["eta_s"] > clock["left_s"]:
            # An ETA past the deadline reads as hours to go; the clock ends the search first.
            lines.append(f"  the clock ends this search before its {summary['remaining']} remaining trial(s) ({how})")
        else:
            eta = config.format_duration(summary["eta_s"])
            lines.append(f"  ETA {eta} for {summary['remaining']} remaining trial(s) ({how})")
    if clock:
        lines.append(
            f"  time budget {config.format_duration(clock['time_s'])}: deadline {clock['deadline']}, "
            + (f"{config.format_duration(clock['left_s'])} left" if clock["left_s"] else "over: no new trial starts")
        )
    if summary["final"]:
        final = summary["final"]
        members = final.get("members", [final["best_trial"]])
        what = f"trial {members[0]}" if len(members) == 1 else f"ensemble of trials {', '.join(map(str, members))}"
        if final.get("trial_models"):
            what += f" + the search's own model of trial(s) {', '.join(map(str, final['trial_models']))}"
        ci = f" (95% CI {final['test_ci95'][0]:.4f}-{final['test_ci95'][1]:.4f})" if final.get("test_ci95") else ""
        lines.append(
            f"  final-train: test accuracy {final['test_accuracy']:.4f}{ci}, {what}, "
            f"{final['epochs']} epochs, in {final['output_dir']}"
        )
    return lines


def _format_status(summary: dict[str, Any]) -> str:
    clock, states = summary.get("time_budget"), summary["states"]
    lines = []
    if clock:  # the clock, not the count, ends a timed search: say so first
        left = f"{config.format_duration(clock['left_s'])} of {config.format_duration(clock['time_s'])} left"
        lines.append(
            f"study {summary['study']}: {left if clock['left_s'] else 'time budget spent'}, "
            f"{summary['started']} trials run ({states['COMPLETE']} complete, {states['PRUNED']} pruned, "
            f"{states['RUNNING']} running)"
        )
    lines += [
        f"study {summary['study']}  ({summary['direction']} {summary['metric']}, budget {summary['n_trials']} "
        f"finished trials of {summary['epochs_per_trial']} epochs{', or the time' if clock else ''})",
        "",
        "  state       trials",
    ]
    lines += [f"  {state:<10}{n:>7}" for state, n in summary["states"].items() if n or state in ("COMPLETE", "PRUNED")]
    for extension in summary["extended"]:
        when = datetime.datetime.fromtimestamp(extension["at"]).strftime("%Y-%m-%d %H:%M")
        changes = (
            [f"trials {extension['n_trials'][0]} -> {extension['n_trials'][1]}"]
            if extension["n_trials"][0] != extension["n_trials"][1]
            else []
        )
        changes += [f"time {config.format_duration(extension['time_s'])} from then"] if extension["time_s"] else []
        lines.append(f"  extended {when}: {', '.join(changes)}")
    epochs = summary["epochs"]
    capped = clock and summary["finished"] < summary["n_trials"]  # a timed study that met its trial cap says so
    finished = f"{summary['finished']}" + (
        f" (the clock ends this search; {summary['n_trials']} is only a cap)" if capped else f"/{summary['n_trials']}"
    )
    lines += [
        "",
        f"  finished {finished}, pruned share {summary['pruned_share']:.0%}, "
        f"{epochs['saved_by_pruning']} epochs saved by pruning ({epochs['saved_share']:.0%} of "
        f"{epochs['trained'] + epochs['saved_by_pruning']})",
    ]
    if summary["best"]:
        best = summary["best"]
        lines.append(f"  best trial {best['number']}: {summary['metric']} {best['value']:.4f}")
        lines.append(
            "    "
            + "  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in best["params"].items())
        )
    for row in summary.get("running", []):
        age = "no heartbeat yet" if row["heartbeat_age_s"] is None else f"heartbeat {row['heartbeat_age_s']:.0f}s ago"
        lines.append(
            f"  running trial {row['number']}: epoch {row['epoch']}/{row['epochs']} on {row['host']} "
            f"pid {row['pid']} {row['device']}, {age}"
        )
    return "\n".join(lines + _status_tail(summary))


@cli.command()
@storage_option
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON (schema hpo-studies/1).")
def studies(storage: str | None, as_json: bool) -> None:
    """Every study in the storage: direction, finished/budget, best value, final test accuracy, running."""
    from hpo import study as study_mod

    found = study_mod.listing(session.open_storage(storage).storage)
    if as_json:
        click.echo(json.dumps(found, indent=2))
        return
    if not found["studies"]:
        click.echo("no studies in this storage yet; `hpo optimize --study NAME` creates one")
        return
    click.echo(_studies_table(found["studies"]))


def _studies_table(found: list[dict[str, Any]]) -> str:
    rows = [("study", "metric", "finished", "best", "test acc", "running")]
    for study in found:
        best = "-" if study["best_value"] is None else f"{study['best_value']:.4f} (trial {study['best_trial']})"
        test = "-" if study["test_accuracy"] is None else f"{100 * study['test_accuracy']:.2f} %"
        metric, finished = (
            f"{study['direction'][:3]} {study['metric'] or '?'}",
            f"{study['finished']}/{study['n_trials'] or '?'}",
        )
        rows.append((study["study"], metric, finished, best, test, str(study["running"]) if study["running"] else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows)


@cli.command()
@study_option
@storage_option
@click.option("--trials", "n_trials", type=int, help="The new trial budget (more than the trials finished so far).")
@click.option("--time", "time_budget", metavar="DURATION", help="A new time budget from now, e.g. 30m.")
def extend(study_arg: str, storage: str | None, n_trials: int | None, time_budget: str | None) -> None:
    """Raise a study's budget; running and restarted workers go on to it."""
    from hpo import study as study_mod

    if n_trials is None and time_budget is None:
        raise click.UsageError("give --trials N, --time DURATION or both")
    time_s = None if time_budget is None else _parse_time(time_budget)
    opened = session.open_study(study_arg, storage)
    cfg = opened.config
    new = study_mod.extend(opened.study, cfg, n_trials, time_s)
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
    from hpo import study as study_mod

    opened = session.open_study(study_arg, storage)
    study, cfg = opened.study, opened.config
    live = study_mod.live_trials(study, opened.storage)
    if live and not force:
        raise HpoError(f"study {cfg.name!r} has workers running trials {live} now. Stop them first, or pass --force.")
    if not yes:
        if not sys.stdin.isatty():
            raise HpoError(
                f"deleting study {cfg.name!r} needs a confirmation and there is no terminal to ask on. Pass --yes."
            )
        click.confirm(f"Delete study {cfg.name!r} with its {len(study.trials)} trials and their artifacts?", abort=True)
    _, artifact_store = opened.artifact_store(artifacts)
    n_trials = len(study.get_trials(deepcopy=False))
    removed = study_mod.delete(study, opened.storage, artifact_store)
    click.echo(f"deleted study {cfg.name!r}: {n_trials} trials and {removed} artifact file(s)")


@cli.command()
@study_option
@storage_option
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON (schema hpo-best/1).")
def best(study_arg: str, storage: str | None, as_json: bool) -> None:
    """The best trial: its number, validation value and parameters."""
    from hpo import study as study_mod

    opened = session.open_study(study_arg, storage)
    found = study_mod.best_of(opened.study, opened.config)
    if as_json:
        click.echo(json.dumps(found, indent=2))
        return
    click.echo(
        f"best trial {found['number']} of study {found['study']}: {found['metric']} {found['value']:.4f} "
        f"({found['epochs']} epochs, {found['duration_s']}s)"
    )
    for key, value in found["params"].items():
        click.echo(f"  {key:<13} {value:.4g}" if isinstance(value, float) else f"  {key:<13} {value}")


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
    from hpo import study as study_mod

    opened = session.open_study(study_arg, storage)
    while True:
        summary = study_mod.summary(opened.study, opened.config, opened.storage)
        text = json.dumps(summary, indent=None if watch else 2) if as_json else _format_status(summary)
        if watch and not as_json and sys.stdout.isatty():
            click.clear()
        click.echo(text)
        over = summary["remaining"] == 0 or (summary["time_budget"] or {}).get("left_s") == 0
        if not watch or (over and not summary["running"]):
            return
        try:
            time.sleep(interval)
        except KeyboardInterrupt:
            return
        if not as_json and not sys.stdout.isatty():
            click.echo("")


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

    from hpo import optuna_compat

    opened = session.open_study(study_arg, storage) if study_arg else session.open_storage(storage)
    page = (
        f"dashboard/studies/{optuna_compat.study_id(opened.study)}"
        if isinstance(opened, session.OpenedStudy)
        else "dashboard"
    )
    location, artifact_store = opened.artifact_store(artifacts)
    click.echo(
        f"optuna-dashboard on {storage_mod.mask(opened.url)}, artifacts in {location}: "
        f"http://{host}:{port}/{page}  (Ctrl-C to stop)"
    )
    run_server(opened.storage, host=host, port=port, artifact_store=artifact_store)


@cli.command()
@click.option(
    "--study",
    "study_arg",
    metavar="NAME|PATH",
    help="Benchmark this study's best trial [default: the notebook CNN, 32/64 filters, 512-unit head].",
)
@storage_option
@click.option("--params", "params_json", metavar="JSON", help="Parameter overrides, e.g. '{\"fc_size\": 256}'.")
@count_option("--images", 256, 20000, "Training images timed per pipeline.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option(
    "--crop-padding",
    type=click.IntRange(0, 8),
    default=4,
    show_default=True,
    help="Pixels of padding for the random crop (plus a random flip), in both pipelines.",
)
@data_option
@device_option
@click.option("--threads", type=int, envvar="HPO_THREADS", help="CPU threads [default: all cores].")
@count_option(
    "--epochs", 0, 0, "Also train this many epochs both ways on the trial split and compare validation accuracy."
)
@count_option("--repeats", 1, 3, "Seeds: of the --epochs accuracy check, or per pruner with --pruners.")
@count_option("--num-workers", 0, 0, "DataLoader workers of the seed pipeline.")
@count_option(
    "--workers", 0, 0, "Also run this many engine processes at once (cores/N threads each, then all cores each)."
)
@count_option(
    "--rounds",
    1,
    3,
    "Interleaved rounds of both pipelines; the medians are compared (a noisy machine's slow spells hit both).",
)
@click.option(
    "--compile",
    "use_compile",
    is_flag=True,
    help="torch.compile the engine's model (the warm-up pass absorbs the compile time, which is reported separately).",
)
@click.option(
    "--search",
    "search_time",
    metavar="DURATION",
    help="Instead: run `hpo optimize --time DURATION --final` on --study (default cnn-quick, with --workers "
    "or 2) and train the notebook CNN for the same DURATION; score both on the test split.",
)
@click.option(
    "--fidelity",
    "fidelity_top",
    type=click.IntRange(0, 20),
    default=5,
    show_default=True,
    help="With --search: retrain this many finalists with another seed and score them on validation (0: skip).",
)
@click.option(
    "--pruners",
    metavar="A,B",
    help="With --search: instead, run the search for DURATION once per pruner and seed (--repeats) and "
    "compare their best validation values, e.g. median,successive_halving,hyperband.",
)
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def bench(
    study_arg: str | None,
    storage: str | None,
    params_json: str | None,
    workers: int,
    rounds: int,
    search_time: str | None,
    fidelity_top: int,
    pruners: str | None,
    as_json: bool,
    **spec_options: Any,
) -> None:
    """Images/s of our training engine against the seed-style notebook pipeline, same model and batch
    (or, with --search, the searched ensemble against the fixed notebook CNN at the same time budget)."""
    from hpo import bench as bench_mod

    if pruners:
        if not search_time:
            raise HpoError("--pruners needs --search DURATION, the time each pruner's search gets, e.g. --search 10m.")
        where = spec_options["data_dir"], spec_options["device"], spec_options["repeats"]
        _bench_pruners(study_arg or "cnn-quick", _parse_time(search_time), workers or 2, pruners, *where, as_json)
        return
    if search_time:
        where = spec_options["data_dir"], spec_options["device"], spec_options["threads"]
        _bench_search(study_arg or "cnn-quick", _parse_time(search_time), workers or 2, *where, fidelity_top, as_json)
        return
    params = dict(bench_mod.DEFAULT_PARAMS)
    if study_arg:
        params.update(session.open_study(study_arg, storage).study.best_trial.params)
    if params_json:
        try:
            params.update(json.loads(params_json))
        except json.JSONDecodeError as e:
            raise HpoError(f"--params is not valid JSON ({e}). Example: --params '{{\"fc_size\": 256}}'") from e
    result = bench_mod.measure(bench_mod.BenchSpec.from_options(params, **spec_options), workers, rounds)
    click.echo(json.dumps(result, indent=2) if as_json else bench_mod.describe(result))


def _bench_search(
    study_arg: str,
    time_s: float,
    workers: int,
    data_dir: str | None,
    device: str | None,
    threads: int | None,
    fidelity_top: int,
    as_json: bool,
) -> None:
    from hpo import bench as bench_mod
    from hpo import data
    from hpo.devices import cpu_count, describe_cpu
    from hpo.final import describe_accuracy

    threads = threads or cpu_count()
    work_dir = storage_mod.RUNS_DIR / "bench-search"
    each = config.format_duration(time_s)
    click.echo(
        f"hpo bench --search: {each} of search + final model, then {each} of the fixed notebook CNN"
        f"{f', then {fidelity_top} finalists retrained for the fidelity report' if fidelity_top else ''}; "
        f"the search's storage and outputs go to {work_dir}/, and each stage's figures to "
        f"{work_dir / 'bench-search.json'} as it ends",
        err=True,
    )
    result = bench_mod.search_against_fixed(
        config.resolve_path(study_arg),
        time_s,
        workers,
        data.find_data_dir(data_dir),
        device,
        threads,
        work_dir,
        fidelity_top,
    )
    result["cpu"] = describe_cpu()
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    searched, fixed, pair = result["search"], result["fixed"], result["paired"]
    click.echo(f"{result['cpu']}, {threads} thread(s), {device or 'cpu'}")
    click.echo(f"at {config.format_duration(time_s)} each, scored once on the 10,000 test images:")
    click.echo(
        f"  {searched['study']} search ({searched['trials']} trials: {searched['complete']} complete, "
        f"{searched['pruned']} pruned) + final model of {len(searched['members'])} member(s) "
        f"(trials {', '.join(map(str, searched['members']))}, {searched['epochs']} epochs"
        + (f"; and trial models {', '.join(map(str, searched['trial_models']))}" if searched["trial_models"] else "")
        + "): "
        f"{describe_accuracy(searched['test_accuracy'], searched['test_ci95'])} in {searched['wall_time_s']:.0f}s"
    )
    click.echo(
        f"  fixed notebook CNN (32/64 filters, FC 512, Adam 1e-3), {fixed['epochs']} epochs, TTA {fixed['tta']}: "
        f"{describe_accuracy(fixed['test_accuracy'], fixed['test_ci95'])} in {fixed['wall_time_s']:.0f}s"
    )
    click.echo(f"  difference: {100 * result['difference']:+.2f} points")
    click.echo(
        f"  paired (McNemar, exact): {pair['only_search']} images only the search's model gets right, "
        f"{pair['only_fixed']} only the fixed CNN; p = {pair['p_value']:.3g}"
    )
    fid = result.get("fidelity")
    if fid:
        click.echo(
            f"fidelity: the top {len(fid['finalists'])} trials by the search's value, retrained with another seed "
            f"for the whole {fid['epochs']} epochs on the trial training split, scored on validation:"
        )
        for row in fid["finalists"]:
            picked = "  <- the finalizer's pick" if row["trial"] == fid["pick"] else ""
            click.echo(
                f"  trial {row['trial']:>4}  {row['state'].lower():<8} search {row['search_value']:.4f} at epoch "
                f"{row['search_epochs']}  retrained {row['retrained_value']:.4f}  ({row['seconds']:.0f}s){picked}"
            )
        click.echo(f"  Spearman's rho {fid['spearman']:.2f}; regret of the pick {100 * fid['regret']:.2f} points")


def _bench_pruners(
    study_arg: str,
    time_s: float,
    workers: int,
    pruners_text: str,
    data_dir: str | None,
    device: str | None,
    seeds: int,
    as_json: bool,
) -> None:
    from hpo import data, pruner_bench
    from hpo.devices import describe_cpu

    pruners = pruner_bench.parse_pruners(pruners_text)
    study_file = config.resolve_path(study_arg)
    work_dir = storage_mod.RUNS_DIR / "bench-pruners"
    each = config.format_duration(time_s)
    click.echo(
        f"hpo bench --pruners: {len(pruners)} pruners x {seeds} seed(s), {each} of search each "
        f"(about {config.format_duration(time_s * len(pruners) * seeds)}); the studies go to {work_dir}/",
        err=True,
    )
    result = pruner_bench.compare(
        study_file, pruners, time_s, workers, seeds, data.find_data_dir(data_dir), device, work_dir
    )
    result["cpu"] = describe_cpu()
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(f"{result['cpu']}, {workers} worker(s), {device or 'the default device'}")
    click.echo(
        f"{result['study']}: {each} of search per run, best {result['metric']} at the final horizon "
        "(validation; the test split is not read):"
    )
    for run in result["runs"]:
        best = "no COMPLETE trial"
        if run["best_value"] is not None:
            best = f"best {run['best_value']:.4f} (trial {run['best_trial']})"
        click.echo(
            f"  {run['pruner']:<19} seed {run['seed']:>3}  {best} at {run['horizon']} epochs; "
            f"{run['trials']} trials ({run['complete']} complete, "
            f"{run['pruned']} pruned, {run['failed']} failed), {run['epochs']} epochs, {run['wall_time_s']:.0f}s"
        )
    first = result["pruners"][0]["pruner"]
    for row in result["pruners"]:
        mean = "-" if row["mean_best"] is None else f"{row['mean_best']:.4f}"
        versus = ""
        if row["vs_first"] is not None:
            versus = f"; {100 * row['vs_first']:+.2f} points against {first}, seed by seed"
        click.echo(
            f"  {row['pruner']:<19} mean best {mean} over {len(row['best_values'])} run(s), "
            f"{row['mean_trials']:.1f} trials, {row['mean_complete']:.1f} complete, "
            f"{row['mean_epochs']:.0f} epochs{versus}"
        )
    click.echo(f"options: {json.dumps(result['options'])}")


def _final_model_path(study_arg: str, model_path: str | None) -> tuple[str, Path]:
    name = session.study_name(study_arg)
    path = Path(model_path) if model_path else storage_mod.final_dir(name) / "model.pt"
    if not path.is_file():
        raise HpoError(
            f"no final model at {path}. Run `hpo final-train --study {name}` first, or pass --model "
            "with the path of its model.pt."
        )
    return name, path


model_option = click.option(
    "--model",
    "model_path",
    type=click.Path(dir_okay=False),
    metavar="PATH",
    help="The final checkpoint [default: runs/STUDY/final/model.pt].",
)


@cli.command()
@study_option
@model_option
@click.option("--top", type=click.IntRange(1, 10), default=1, show_default=True, help="Classes shown per image.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per image.")
@device_option
@click.argument("images", nargs=-1, required=True, metavar="IMAGE...")
def predict(
    study_arg: str, model_path: str | None, top: int, as_json: bool, device: str | None, images: tuple[str, ...]
) -> None:
    """Class and probability of each IMAGE (PNG or JPEG, any size, grey or colour) under the final model."""
    from hpo import inference
    from hpo.devices import place

    name, path = _final_model_path(study_arg, model_path)
    model, meta = inference.load_model(path, name, place(device).device)
    results = inference.predict_files(model, [Path(p) for p in images], top, info=meta["data"])
    for result in results:
        if result.error:
            click.echo(f"{result.path}: cannot predict: {result.error}", err=True)
            if not as_json:
                continue
        if as_json:
            top_k = [{"label": c, "probability": p} for c, p in result.top]
            row = {"path": result.path, "label": result.label, "probability": result.probability, "top": top_k}
            click.echo(json.dumps({**row, "error": result.error}))
        else:
            others = "  ".join(f"{c} {p:.4f}" for c, p in result.top[1:])
            click.echo(f"{result.path}\t{result.label}\t{result.probability:.4f}" + (f"\t{others}" if others else ""))
    failed = sum(1 for result in results if result.error)
    if failed:
        raise HpoError(f"{failed} of {len(results)} files could not be predicted (reasons above); the others were.")


@cli.command()
@study_option
@model_option
@click.option("--format", "fmt", type=click.Choice(["torchscript", "onnx"]), required=True)
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    help="Output file [default: beside the checkpoint, model.ts or model.onnx].",
)
@click.option(
    "--check/--no-check",
    default=True,
    show_default=True,
    help="Compare the exported model's outputs with the PyTorch model's on the test split.",
)
@data_option
def export(
    study_arg: str, model_path: str | None, fmt: str, out: str | None, check: bool, data_dir: str | None
) -> None:
    """Write the final model as a self-contained TorchScript or ONNX file (normalisation and class names inside)."""
    from hpo import inference, sources

    name, path = _final_model_path(study_arg, model_path)
    model, meta = inference.load_model(path, name)
    info = meta["data"]
    target = Path(out) if out else path.with_suffix(inference.EXPORT_FORMATS[fmt])
    inference.export(model, meta, fmt, target)
    click.echo(
        f"wrote {target} ({target.stat().st_size / 1e6:.1f} MB, {fmt}): input {inference.input_text(info)}, "
        f"output log-probabilities (N, {len(info['classes'])}); class names and normalisation in its metadata"
    )
    if not check:
        return
    images = sources.test_images(info, data_dir)
    result = inference.check_export(model, target, fmt, images, info)
    click.echo(
        f"check on the {result.images:,} test images: max |output difference| {result.max_diff:.2e}, "
        f"same class for {result.agree:.2%}"
    )
    if not result.ok:
        raise HpoError(
            f"the exported {fmt} model does not match the PyTorch model (max difference "
            f"{result.max_diff:.2e}, {result.agree:.2%} same class). Report this with the versions of "
            "torch and the runtime."
        )


_PROCESS_STARTED_AT: float | None = None  # set by main(): `hpo` run as a command, not in-process


def main() -> None:
    global _PROCESS_STARTED_AT
    _PROCESS_STARTED_AT = time.time()
    cli(prog_name="hpo")
