"""`hpo` commands: each parses its options, calls one library function and prints the result.

Errors a user can cause are `HpoError`s; they print as one line and exit 1 (`--debug` re-raises).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import click

from hpo.errors import HpoError
from hpo.paths import bench_dir, final_dir
from hpo.results import report
from hpo.search import session
from hpo.search.storage import default_url, mask
from hpo.settings import config
from hpo.settings.durations import parse_duration
from hpo.settings.writer import to_toml

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
    "--storage", envvar="HPO_STORAGE", metavar="URL", help=f"Storage URL [env HPO_STORAGE; default {default_url()}]."
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
    from hpo.search.worker import Request, Shutdown, start

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

    time_s = _parse_time(time_budget) if time_budget else None
    request = launch.Request(
        study_arg, workers, time_s, run_final, storage, data_dir, device, artifacts, _PROCESS_STARTED_AT or time.time()
    )
    launch.optimize(request, click.echo)


def _parse_time(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as e:
        raise HpoError(f"--time: {e}.") from e


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
    time_s = None if time_budget is None else _parse_time(time_budget)
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
    from hpo.bench import pipelines

    if pruners and not search_time:
        raise HpoError("--pruners needs --search DURATION, the time each pruner's search gets, e.g. --search 10m.")
    if search_time:
        kind = "pruners" if pruners else "search"
        setup = _bench_setup(study_arg or "cnn-quick", search_time, workers, spec_options, kind)
        if pruners:
            return _bench_pruners(setup, pruners, spec_options["repeats"], as_json)
        return _bench_search(setup, fidelity_top, as_json)
    best = session.open_study(study_arg, storage).study.best_trial.params if study_arg else {}
    spec = pipelines.BenchSpec.from_options(pipelines.params_for(best, params_json), **spec_options)
    result = pipelines.measure(spec, workers, rounds)
    click.echo(json.dumps(result, indent=2) if as_json else pipelines.describe(result))


def _bench_setup(study_arg: str, search_time: str, workers: int, spec_options: dict[str, Any], kind: str) -> Any:
    from hpo.bench.search import Setup
    from hpo.learn.data import find_data_dir
    from hpo.learn.devices import cpu_count

    where = find_data_dir(spec_options["data_dir"]), spec_options["device"], spec_options["threads"] or cpu_count()
    return Setup(config.resolve_path(study_arg), _parse_time(search_time), workers or 2, *where, bench_dir(kind))


def _bench_search(setup: Any, fidelity_top: int, as_json: bool) -> None:
    from hpo.bench import search
    from hpo.learn.devices import describe_cpu

    click.echo(report.bench_search_banner(setup.time_s, fidelity_top, setup.work_dir), err=True)
    result = {**search.search_against_fixed(setup, fidelity_top), "cpu": describe_cpu()}
    click.echo(
        json.dumps(result, indent=2)
        if as_json
        else report.bench_search_text(result, setup.time_s, setup.threads, setup.device)
    )


def _bench_pruners(setup: Any, pruners_text: str, seeds: int, as_json: bool) -> None:
    from hpo.bench import pruners as pruner_bench
    from hpo.learn.devices import describe_cpu
    from hpo.settings.durations import format_duration

    pruners = pruner_bench.parse_pruners(pruners_text)
    click.echo(report.bench_pruners_banner(setup.time_s, len(pruners), seeds, setup.work_dir), err=True)
    result = {**pruner_bench.compare(setup, pruners, seeds), "cpu": describe_cpu()}
    text = report.bench_pruners_text(result, setup.workers, setup.device, format_duration(setup.time_s))
    click.echo(json.dumps(result, indent=2) if as_json else text)


def _final_model_path(study_arg: str, model_path: str | None) -> tuple[str, Path]:
    name = session.study_name(study_arg)
    path = Path(model_path) if model_path else final_dir(name) / "model.pt"
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
    from hpo.learn import inference
    from hpo.learn.devices import place

    name, path = _final_model_path(study_arg, model_path)
    model, meta = inference.load_model(path, name, place(device).device)
    results = inference.predict_files(model, [Path(p) for p in images], top, info=meta["data"])
    for result in results:
        if result.error:
            click.echo(f"{result.path}: cannot predict: {result.error}", err=True)
        if as_json or not result.error:
            click.echo(report.prediction_line(result, as_json))
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
    from hpo.learn import inference, sources

    name, path = _final_model_path(study_arg, model_path)
    model, meta = inference.load_model(path, name)
    target = Path(out) if out else path.with_suffix(inference.EXPORT_FORMATS[fmt])
    inference.export(model, meta, fmt, target)
    info = meta["data"]
    click.echo(report.export_line(target, fmt, inference.input_text(info), len(info["classes"])))
    if check:
        result = inference.check_export(model, target, fmt, sources.test_images(info, data_dir), info)
        click.echo(report.export_check_line(result))
        if not result.ok:
            raise HpoError(report.export_mismatch(result, fmt))


_PROCESS_STARTED_AT: float | None = None  # set by main(): `hpo` run as a command, not in-process


def main() -> None:
    global _PROCESS_STARTED_AT
    _PROCESS_STARTED_AT = time.time()
    cli(prog_name="hpo")
